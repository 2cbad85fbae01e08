"""Float64-side quantizers: turn a float64 weight ``[N, K]`` into the checkpoint tensors of
each linear scheme, exactly as ``heteroserve.core.kernels.linear`` lays them out.

Written for the suite from the scheme definitions (not shared with any platform), so a
platform's loader and ``apply`` are checked against an independent producer. Scales are
rounded to their stored dtype *before* quantizing, so that dequantizing the stored tensors is
the reference weight.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, FP8_BLOCK
from heteroserve.core.kernels.ops import MoEWeightQuant


def fp8_max(fp8_dtype: torch.dtype) -> float:
    """Largest finite value of ``fp8_dtype`` (448 for e4m3fn, 240 for e4m3fnuz)."""
    return float(torch.finfo(fp8_dtype).max)


def to_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Round float64 ``x`` to ``fp8_dtype`` (saturating at its max)."""
    m = fp8_max(fp8_dtype)
    return x.clamp(-m, m).to(fp8_dtype)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` values in 0..15 -> int32 ``[...]`` with nibble ``j`` at bits ``4j``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    word = (nibbles.to(torch.int64) << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def quantize_fp8_per_tensor(w: torch.Tensor, fp8_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight [N, K]`` fp8 and ``weight_scale [1]`` fp32 with ``W ~ weight * scale``."""
    scale = (w.abs().max() / fp8_max(fp8_dtype)).to(torch.float32).reshape(1)
    return {"weight": to_fp8(w / scale.double(), fp8_dtype), "weight_scale": scale}


def quantize_fp8_per_channel(w: torch.Tensor, fp8_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight [N, K]`` fp8 and ``weight_scale [N, 1]`` fp32, one scale per output row."""
    scale = (w.abs().amax(dim=1, keepdim=True) / fp8_max(fp8_dtype)).to(torch.float32)
    return {"weight": to_fp8(w / scale.double(), fp8_dtype), "weight_scale": scale}


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


def quantize_fp8_block(w: torch.Tensor, fp8_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight [N, K]`` fp8 and ``weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32, one
    scale per 128x128 block (ragged edge blocks included)."""
    n, k = w.shape
    scales = torch.empty(_blocks(n), _blocks(k), dtype=torch.float32)
    for i in range(_blocks(n)):
        for j in range(_blocks(k)):
            block = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            scales[i, j] = block.abs().max() / fp8_max(fp8_dtype)
    full = scales.double().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return {"weight": to_fp8(w / full[:n, :k], fp8_dtype), "weight_scale_inv": scales}


def quantize_fp8_block_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """float64 experts ``[E, N, K]`` -> ``(float8_e4m3fn values, fp32 block scales [E,
    ceil(N/128), ceil(K/128)], float64 dequantized weights)``, each expert as
    :func:`quantize_fp8_block` does it."""
    parts = [quantize_fp8_block(w[e], torch.float8_e4m3fn) for e in range(w.shape[0])]
    values = torch.stack([p["weight"] for p in parts])
    scales = torch.stack([p["weight_scale_inv"] for p in parts])
    full = scales.double().repeat_interleave(FP8_BLOCK, 1).repeat_interleave(FP8_BLOCK, 2)
    return values, scales, values.double() * full[:, :w.shape[1], :w.shape[2]]


def quantize_w4_experts(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    """float64 experts ``[E, N, K]`` -> the fused MoE contract's ``w4a16`` experts: ``(words
    int32 [E, N, K/8], scales fp32 [E, N, K/G], zeros int8 [E, N, K/G], float64 dequantized
    weights)``; per output row and group of ``G`` inputs an asymmetric min/max grid (scale
    rounded to fp32 first, zero point in 0..15)."""
    e, n, k = w.shape
    grouped = w.reshape(e, n, k // group, group)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.float32)
    zero = torch.round(-lo / scale.double()).clamp(0, 15)
    q = torch.round(grouped / scale.double()[..., None] + zero[..., None]).clamp(0, 15)
    deq = ((q - zero[..., None]) * scale.double()[..., None]).reshape(e, n, k)
    words = pack_nibbles(q.reshape(e, n, k // 8, 8))
    return words, scale, zero.to(torch.int8), deq


def quantized_experts(scheme: str, w13: torch.Tensor, w2: torch.Tensor, group: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                     MoEWeightQuant, torch.Tensor, torch.Tensor]:
    """float64 experts ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` in expert scheme ``scheme``
    (``fp8_block``, or ``w4a16`` with groups of ``group``): ``(w13, w2, quant)`` as the fused
    MoE op takes them, on ``device``, then the float64 weights they mean (for the oracle).
    Raises ``ValueError`` for another scheme."""
    if scheme == "fp8_block":
        w13_q, s13, w13_d = quantize_fp8_block_experts(w13.cpu())
        w2_q, s2, w2_d = quantize_fp8_block_experts(w2.cpu())
        quant = MoEWeightQuant(scheme, s13.to(device), s2.to(device))
    elif scheme == "w4a16":
        w13_q, s13, z13, w13_d = quantize_w4_experts(w13.cpu(), group)
        w2_q, s2, z2, w2_d = quantize_w4_experts(w2.cpu(), group)
        quant = MoEWeightQuant(scheme, s13.to(device), s2.to(device), z13.to(device),
                               z2.to(device), group)
    else:
        raise ValueError(f"no quantizer for {scheme} experts")
    return w13_q.to(device), w2_q.to(device), quant, w13_d.to(device), w2_d.to(device)


def quantize_int8_per_channel(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight [N, K]`` int8 (symmetric) and ``weight_scale [N, 1]`` fp32."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).to(torch.float32)
    q = torch.round(w / scale.double()).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def _asym_4bit(w: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column of ``w [rows, N]``: fp16-rounded scale, zero point in ``lo..15`` and the
    4-bit codes of each row."""
    wmin, wmax = w.amin(dim=0), w.amax(dim=0)
    scale = ((wmax - wmin) / 15.0).clamp(min=1e-4).to(torch.float16).double()
    zero = torch.round(-wmin / scale).clamp(lo, 15)
    q = torch.round(w / scale + zero).clamp(0, 15)
    return scale, zero, q


def pack_awq(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """AWQ W4A16: ``qweight [K, N/8]``, ``qzeros [K/G, N/8]`` int32 (nibble ``j`` = column
    ``8w + AWQ_ORDER[j]``) and ``scales [K/G, N]`` fp16, for ``W [N, K]``."""
    wt = w.T  # [K, N]
    k, n = wt.shape
    q = torch.empty(k, n, dtype=torch.float64)
    zeros = torch.empty(k // group_size, n, dtype=torch.float64)
    scales = torch.empty(k // group_size, n, dtype=torch.float64)
    for g in range(k // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        scales[g], zeros[g], q[rows] = _asym_4bit(wt[rows], 0)
    order = list(AWQ_ORDER)
    return {"qweight": pack_nibbles(q.view(k, n // 8, 8)[..., order]),
            "qzeros": pack_nibbles(zeros.view(-1, n // 8, 8)[..., order]),
            "scales": scales.to(torch.float16)}


def pack_gptq(w: torch.Tensor, group_size: int,
              g_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """GPTQ v1 W4A16: ``qweight [K/8, N]`` (nibble ``j`` = row ``8w + j``), ``qzeros
    [K/G, N/8]`` (zero point minus 1, nibble ``j`` = column ``8w + j``), ``scales [K/G, N]``
    fp16 and, when given, ``g_idx [K]`` int32 (the group of each input row)."""
    wt = w.T
    k, n = wt.shape
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // group_size
    q = torch.empty(k, n, dtype=torch.float64)
    zeros = torch.empty(k // group_size, n, dtype=torch.float64)
    scales = torch.empty(k // group_size, n, dtype=torch.float64)
    for g in range(k // group_size):
        rows = (groups == g).nonzero(as_tuple=True)[0]
        scales[g], zeros[g], q[rows] = _asym_4bit(wt[rows], 1)
    out = {"qweight": pack_nibbles(q.view(k // 8, 8, n).permute(0, 2, 1)),
           "qzeros": pack_nibbles((zeros - 1).view(-1, n // 8, 8)),
           "scales": scales.to(torch.float16)}
    if g_idx is not None:
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def _grid_round(t: torch.Tensor, scheme: str, fp8_dtype: torch.dtype | None) -> torch.Tensor:
    if scheme == "int8_w8a8":
        return torch.round(t)
    assert fp8_dtype is not None
    return to_fp8(t, fp8_dtype).double()


def w8a8_activations(gen: torch.Generator, tokens: int, k: int, scheme: str,
                     dtype: torch.dtype, fp8_dtype: torch.dtype | None) -> torch.Tensor:
    """Activations ``[tokens, k]`` in ``dtype`` (host) whose dynamic quantization is
    unambiguous in any precision: each quantization group (the tensor, a token, or a token's
    128 columns) has a power-of-two scale ``s`` and one element at exactly ``+-max * s`` (so
    ``amax / max == s`` exactly), and no element lies within 1e-4 (relative) of a rounding
    boundary of the int8 / fp8 grid."""
    qmax = 127.0 if scheme == "int8_w8a8" else fp8_max(fp8_dtype)  # type: ignore[arg-type]
    t = (torch.randn(tokens, k, generator=gen, dtype=torch.float64) * qmax / 3).clamp(-qmax, qmax)
    if scheme == "fp8_per_tensor":
        groups = [(slice(None), slice(None))]
    elif scheme in ("int8_w8a8", "fp8_per_channel"):
        groups = [(slice(r, r + 1), slice(None)) for r in range(tokens)]
    else:
        groups = [(slice(r, r + 1), slice(c, c + FP8_BLOCK))
                  for r in range(tokens) for c in range(0, k, FP8_BLOCK)]
    scale = torch.empty(tokens, k, dtype=torch.float64)
    for rows, cols in groups:
        block = t[rows, cols]
        flat = int(torch.randint(0, block.numel(), (1,), generator=gen))
        block.view(-1)[flat] = qmax if flat % 2 else -qmax
        t[rows, cols] = block
        # amax = max * s between 1 and 8
        exponent = int(torch.randint(0, 4, (1,), generator=gen)) - int(torch.tensor(qmax).log2())
        scale[rows, cols] = 2.0 ** exponent
    x = (t * scale).to(dtype).double()
    tq = x / scale
    near = _grid_round(tq * (1 + 1e-4), scheme, fp8_dtype) != \
        _grid_round(tq * (1 - 1e-4), scheme, fp8_dtype)
    tq[near] = _grid_round(tq[near], scheme, fp8_dtype)
    return (tq * scale).to(dtype)
