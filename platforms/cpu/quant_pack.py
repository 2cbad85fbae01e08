"""Pure-torch producers (and unpackers) of quantized checkpoint tensors, in exactly the
layouts ``core/kernels/linear.py`` defines. Tests and the conformance suite use the
producers to make checkpoints; the torch-native linear methods use the unpackers.

Layouts (``w [N, K]`` float, ``N`` output features, ``K`` input features, ``G`` group size):

- fp8 per tensor: ``weight [N, K]`` fp8 = ``w / s`` saturated, ``weight_scale [1]`` fp32
  with ``s = amax|w| / fp8_max``.
- fp8 block: ``weight [N, K]`` fp8, ``weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32,
  one ``s = amax / fp8_max`` per 128x128 block (edge blocks partial).
- int8 per channel: ``weight [N, K]`` int8 = ``round(w / s)``, ``weight_scale [N, 1]`` fp32
  with ``s = amax|w[n]| / 127``.
- AWQ (asymmetric, 4-bit): ``qweight [K, N/8]`` int32, ``qzeros [K/G, N/8]`` int32, ``scales
  [K/G, N]`` fp16. Nibble ``j`` (bits ``4j..4j+3``) of word ``w`` holds column
  ``8*w + AWQ_ORDER[j]``. ``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.
- GPTQ (4-bit, v1 zero points): ``qweight [K/8, N]`` int32, nibble ``j`` of word ``(w, n)``
  holds row ``8*w + j``; ``qzeros [K/G, N/8]`` int32, nibble ``j`` of word ``(g, w)`` holds
  ``zero[g, 8*w + j] - 1``; ``scales [K/G, N]`` fp16; ``g_idx [K]`` int32.
  ``W[n, k] = (q[k, n] - (z[g_idx[k], n] + 1)) * s[g_idx[k], n]``.

All 4-bit quantizers round the fp16 scale first and quantize with it, so dequantizing the
packed tensors reproduces exactly the weights the quantizer chose.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, FP8_BLOCK

_MIN_SCALE = 1e-12
_NIBBLE_SHIFTS = tuple(4 * j for j in range(8))


def _fp8_max(fp8_dtype: torch.dtype) -> float:
    return float(torch.finfo(fp8_dtype).max)


def quantize_fp8_per_tensor(w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(weight [N, K] fp8, weight_scale [1] fp32)``; ``W ≈ weight * scale``."""
    fmax = _fp8_max(fp8_dtype)
    wf = w.to(torch.float32)
    scale = (wf.abs().amax() / fmax).clamp(min=_MIN_SCALE).reshape(1)
    return (wf / scale).clamp(-fmax, fmax).to(fp8_dtype), scale


def quantize_fp8_block(w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                       block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(weight [N, K] fp8, weight_scale_inv [ceil(N/b), ceil(K/b)] fp32)``;
    ``W[n, k] ≈ weight[n, k] * weight_scale_inv[n // b, k // b]``."""
    fmax = _fp8_max(fp8_dtype)
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.nn.functional.pad(w.to(torch.float32), (0, kb * block - k, 0, nb * block - n))
    blocks = padded.view(nb, block, kb, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / fmax).clamp(min=_MIN_SCALE)
    q = (blocks / scale[:, None, :, None]).clamp(-fmax, fmax).view(nb * block, kb * block)
    return q[:n, :k].contiguous().to(fp8_dtype), scale


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(weight [N, K] int8, weight_scale [N, 1] fp32)``, symmetric,
    round half to even; ``W ≈ weight * weight_scale``."""
    wf = w.to(torch.float32)
    scale = (wf.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=_MIN_SCALE)
    return torch.round(wf / scale).clamp(-128, 127).to(torch.int8), scale


# -- 4-bit ------------------------------------------------------------------------------------
def _group_reduce(wt: torch.Tensor, g_idx: torch.Tensor, groups: int, how: str) -> torch.Tensor:
    """Reduce ``wt [K, N]`` over the rows of each group -> ``[groups, N]``."""
    index = g_idx.to(torch.long)[:, None].expand_as(wt)
    out = torch.zeros((groups, wt.shape[1]), dtype=wt.dtype, device=wt.device)
    return out.scatter_reduce(0, index, wt, reduce=how, include_self=False)


def quantize_w4(w: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None = None,
                zero_range: tuple[int, int] = (0, 15)
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w [N, K]`` to 4 bits per input-row group.

    Groups: ``g_idx [K]`` (default ``k // group_size``). Symmetric: ``s = 2 amax / 15``,
    zero 8. Asymmetric: ``s = (max - min) / 15``, zero ``round(-min / s)`` clamped to
    ``zero_range``. ``q = clamp(round(w / s) + zero, 0, 15)``. Returns ``(q [K, N] int64,
    zeros [K/G, N] int64, scales [K/G, N] fp16)``.
    """
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    groups = k // group_size
    wt = w.to(torch.float32).t().contiguous()
    if g_idx is None:
        g_idx = torch.arange(k, device=w.device) // group_size
    g_idx = g_idx.to(torch.long)
    gmax = _group_reduce(wt, g_idx, groups, "amax")
    gmin = _group_reduce(wt, g_idx, groups, "amin")
    if sym:
        scales = (2 * torch.maximum(gmax.abs(), gmin.abs()) / 15).clamp(min=1e-5)
        scales = scales.to(torch.float16).to(torch.float32)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        scales = ((gmax - gmin) / 15).clamp(min=1e-5).to(torch.float16).to(torch.float32)
        zeros = torch.round(-gmin / scales).clamp(*zero_range).to(torch.int64)
    q = torch.round(wt / scales[g_idx]) + zeros[g_idx]
    return q.clamp(0, 15).to(torch.int64), zeros, scales.to(torch.float16)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def pack_nibbles(values: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack ``values [..., 8m]`` (ints in 0..15) along the last dim into int32 ``[..., m]``:
    nibble ``j`` of word ``w`` holds element ``8*w + order[j]``."""
    if values.shape[-1] % 8:
        raise ValueError(f"cannot pack {values.shape[-1]} nibbles into int32 words")
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)[..., list(order)]
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int64, device=values.device)
    return _to_int32((v << shifts).sum(dim=-1))


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int32 ``[..., m]`` -> uint8 ``[..., 8m]``."""
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int64, device=words.device)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & 0xF
    inverse = sorted(range(8), key=lambda j: order[j])
    return nibbles[..., inverse].reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_awq(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> AWQ ``(qweight [K, N/8] int32, qzeros [K/G, N/8] int32, scales
    [K/G, N] fp16)``, asymmetric. Raises ``ValueError`` unless ``N % 8 == 0`` and
    ``K % group_size == 0``."""
    if w.shape[0] % 8:
        raise ValueError(f"AWQ needs output size divisible by 8, got {w.shape[0]}")
    q, zeros, scales = quantize_w4(w, group_size, sym=False)
    return pack_nibbles(q, AWQ_ORDER), pack_nibbles(zeros, AWQ_ORDER), scales


def gptq_act_order_g_idx(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """A deterministic act-order ``g_idx [K]`` int32: input rows sorted by descending column
    energy ``sum_n w[n, k]^2`` (a stand-in for GPTQ's Hessian diagonal), ``G`` per group."""
    energy = w.to(torch.float32).pow(2).sum(dim=0)
    perm = torch.sort(energy, descending=True, stable=True)[1]
    g_idx = torch.empty_like(perm)
    g_idx[perm] = torch.arange(perm.numel(), device=w.device) // group_size
    return g_idx.to(torch.int32)


def pack_gptq(w: torch.Tensor, group_size: int, act_order: bool = False, sym: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> GPTQ v1 ``(qweight [K/8, N] int32, qzeros [K/G, N/8] int32, scales
    [K/G, N] fp16, g_idx [K] int32)``. ``act_order`` uses :func:`gptq_act_order_g_idx`;
    asymmetric zero points are kept in 1..15 so ``zero - 1`` fits a nibble. Raises
    ``ValueError`` unless ``N % 8 == 0``, ``K % 8 == 0`` and ``K % group_size == 0``."""
    n, k = w.shape
    if n % 8 or k % 8:
        raise ValueError(f"GPTQ needs input and output sizes divisible by 8, got N={n}, K={k}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"input size {k} is not a multiple of group size {group_size}")
    if act_order:
        g_idx = gptq_act_order_g_idx(w, group_size)
    else:
        g_idx = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    q, zeros, scales = quantize_w4(w, group_size, sym=sym, g_idx=g_idx, zero_range=(1, 15))
    qweight = pack_nibbles(q.t().contiguous()).t().contiguous()  # rows 8w+j -> nibble j
    return qweight, pack_nibbles(zeros - 1), scales, g_idx
