"""Triton GEMV for 4-bit weights (AWQ / GPTQ after repacking) at decode sizes: ``y = x @ W``
with the nibbles unpacked in registers and the packed words read once.

Layout (:mod:`.w4a16_gemm`, made by :mod:`.w4a16_pack`): ``qweight [ceil(K/8), N]`` int32,
nibble ``j`` of word ``[w, n]`` = ``q[8w + j, n]``; ``zeros``, ``scales`` ``[G, N]`` fp16;
``W[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]``. A program owns
``BLOCK_N`` columns (``4 * BLOCK_N`` contiguous bytes of each word row, whole 32-byte sectors
from ``BLOCK_N = 8``) and walks all of K in ``[BLOCK_KW, BLOCK_N]`` word tiles; no split-K.

Per word the eight products are summed before the zero point and scale apply (they share a
group: groups are multiples of 8 rows), ``s * (sum_j q_j x_j - z * sum_j x_j)``. At the copy
rate the H200's issue slots allow about four instructions per nibble, so the per-nibble work
is one logic op and one FMA (``NIBBLE_SUBNORMAL``): nibble ``j`` (``j < 5``) masked in place,
``bits & (15 << 4j)``, is an integer below ``2**23``, so read as fp32 it is the subnormal
``q * 2**(4j - 149)``, exactly; ``x_j`` is pre-scaled by ``2**(88 - 4j)`` (once per word row,
shared by the thread's columns), so every product lands at ``q_j x_j 2**-61`` in the normal
range (for ``|x| < 2**40``), and the word's sum is scaled back once. Nibbles 5..7 come from
the word shifted right by 20. (GPUs multiply subnormals at full rate; Triton does not flush
them in plain arithmetic.) ``NIBBLE_EXPONENT``, the previous decoding, or-s the masked bits
under the exponent of ``2**23`` and subtracts it: one more float op per nibble (5.6 against
3.9 SASS instructions a nibble in the sm_90 loop, ``benchmarks/kernel_sass.py``;
Llama-3.1-8B's four layers 69.4 -> 53.2 us at the same launch shapes on an H100,
``benchmarks/results/h100-20261205-1917-quant_gemv_w4.json``). No int-to-float conversion
either way, which would bound the kernel below the copy rate. The group size is a
compile-time constant, so a word row's group is a shift, not a division.

Grid: ``(rows, cdiv(N, BLOCK_N))``, rows fastest (their programs share the weight slice
through L2). The first word tile loads before the PDL wait (the weights are parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous
from heteroserve.platforms.triton.w4a16_pack import unpack_rows

#: at most this many rows go through the GEMV (more: the dequant-GEMM)
W4_GEMV_MAX_ROWS = 4
#: nibble decodings (:class:`W4GemvConfig` ``nibble``; see the module)
NIBBLE_SUBNORMAL, NIBBLE_EXPONENT = "subnormal", "exponent"
_TWO_23 = tl.constexpr(8388608.0)
_X_EXP = tl.constexpr(88)  # x_j is pre-scaled by 2**(88 - 4j): products land at 2**-61
_UNSCALE = tl.constexpr(2.0 ** 61)


@triton.jit
def _nibble(src, SHIFT: tl.constexpr, SUBNORMAL: tl.constexpr):
    """The nibble at bits ``SHIFT..SHIFT+3`` (``SHIFT <= 16``) of int32 ``src`` as fp32:
    ``q * 2**(SHIFT - 149)`` (a subnormal) or ``q * 2**SHIFT``."""
    if SUBNORMAL:
        return (src & (15 << SHIFT)).to(tl.float32, bitcast=True)
    else:
        bits = (src & (15 << SHIFT)) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - _TWO_23


@triton.jit
def _prescale(xj, SHIFT: tl.constexpr, SUBNORMAL: tl.constexpr):
    """``x_j`` scaled so that its product with :func:`_nibble` ``(.., SHIFT, ..)`` is
    ``q x_j 2**-61`` (subnormal decoding) or ``q x_j``."""
    if SUBNORMAL:
        return xj * (2.0 ** (_X_EXP - SHIFT))
    else:
        return xj * (0.0625 ** (SHIFT // 4))


@triton.jit
def _tile(words, x_row, z_ptr, s_ptr, ww, offs_n, n_mask, kw, K, stride_zg, stride_sg, acc,
          EVEN: tl.constexpr, GROUP_W: tl.constexpr, SUBNORMAL: tl.constexpr):
    """``acc + s * (sum_j q_j x_j - z * sum_j x_j)`` for the word rows ``ww`` (see the
    module)."""
    wn_mask = (ww < kw)[:, None] & n_mask[None, :]
    g = ww // GROUP_W
    z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=wn_mask, other=0.0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=wn_mask, other=0.0)
    high = words >> 20
    dot = tl.zeros(acc.shape, dtype=tl.float32)
    x_sum = tl.zeros([acc.shape[0]], dtype=tl.float32)
    for j in tl.static_range(8):
        kk = ww * 8 + j
        if EVEN:
            xj = tl.load(x_row + kk, eviction_policy="evict_last").to(tl.float32)
        else:
            xj = tl.load(x_row + kk, mask=kk < K, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)
        x_sum += xj
        if j < 5:
            dot += _nibble(words, 4 * j, SUBNORMAL) * _prescale(xj, 4 * j, SUBNORMAL)[:, None]
        else:
            dot += _nibble(high, 4 * (j - 5), SUBNORMAL) * \
                _prescale(xj, 4 * (j - 5), SUBNORMAL)[:, None]
    if SUBNORMAL:
        dot = dot * _UNSCALE
    return acc + s.to(tl.float32) * (dot - z.to(tl.float32) * x_sum[:, None])


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, y_ptr, N, K,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, GROUP_W: tl.constexpr, SUBNORMAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_KW)
    n_mask = offs_n < N
    kw = tl.cdiv(K, 8)
    q_ptrs = qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :]
    if EVEN:
        words = tl.load(q_ptrs, eviction_policy="evict_first")
    else:
        words = tl.load(q_ptrs, mask=(offs_w < kw)[:, None] & n_mask[None, :], other=0,
                        eviction_policy="evict_first")
    wait_for_previous(USE_PDL)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = _tile(words, x_row, z_ptr, s_ptr, offs_w, offs_n, n_mask, kw, K, stride_zg,
                stride_sg, tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32), EVEN, GROUP_W,
                SUBNORMAL)
    for w0 in range(BLOCK_KW, kw, BLOCK_KW):
        ww = w0 + offs_w
        q_ptrs += BLOCK_KW * stride_qk
        if EVEN:
            words = tl.load(q_ptrs, eviction_policy="evict_first")
        else:
            words = tl.load(q_ptrs, mask=(ww < kw)[:, None] & n_mask[None, :], other=0,
                            eviction_policy="evict_first")
        acc = _tile(words, x_row, z_ptr, s_ptr, ww, offs_n, n_mask, kw, K, stride_zg,
                    stride_sg, acc, EVEN, GROUP_W, SUBNORMAL)
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty),
             mask=n_mask)


@dataclass(frozen=True)
class W4GemvConfig:
    """Launch shape: output columns per program, packed words (8 K-rows each) per step,
    warps, pipeline stages; and the nibble decoding (``NIBBLE_SUBNORMAL`` or
    ``NIBBLE_EXPONENT``)."""

    block_n: int
    block_kw: int
    num_warps: int
    num_stages: int
    nibble: str = NIBBLE_SUBNORMAL


def choose_w4_config(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    """Eight warps; 32 columns a program (128-byte word rows) where that still leaves four
    programs per multiprocessor, else 16 (8 for narrow layers), and 8 KiB word tiles at 32
    columns, 16 KiB below. The best shapes of the subnormal decoding's sweep at
    Llama-3.1-8B's layers (``benchmarks/quant_gemv_sweep.py --sweep --schemes awq_w4a16``,
    H100, 2026-12-05: qkv 16 x 128 words, o and down 16 x 256, gate_up 32 x 64, all with 8
    warps; 4-warp 4 KiB tiles were 8-44 % slower). The exponent decoding where
    :func:`keeps_subnormals` found the device flushing subnormals."""
    nibble = (NIBBLE_SUBNORMAL if _KEEPS_SUBNORMALS.get((device.type, device.index), True)
              else NIBBLE_EXPONENT)
    if device.type == "cpu":  # the interpreter: small tiles exercise the masks
        return W4GemvConfig(16, 8, 1, 1, nibble)
    sms = multiprocessors(device)
    block_n = 32
    while block_n > 8 and rows * triton.cdiv(n, block_n) < (4 if block_n == 32 else 1) * sms:
        block_n //= 2
    while triton.cdiv(n, block_n) > 65535:  # CUDA's limit on the second grid dimension
        block_n *= 2
    words = 2048 if block_n >= 32 else 4096
    block_kw = min(max(1, words // block_n), triton.next_power_of_2(triton.cdiv(k, 8)))
    return W4GemvConfig(block_n, block_kw, 8, 1, nibble)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, group: int, bias: torch.Tensor | None = None,
               config: W4GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16/fp32, last dim contiguous; ``M <= W4_GEMV_MAX_ROWS`` is where
    it pays) times the packed 4-bit ``W [K, N]`` (+ ``bias [N]``) -> ``[M, N]`` in
    ``x.dtype``, fp32 accumulation. ``group``: K-rows per zero/scale row, a multiple of 8
    (``g_idx`` layouts go to the GEMM; each group size compiles its own kernel). ``|x|``
    must stay below ``2**40`` (see the module). Raises ``ValueError`` on mismatched shapes
    or an unknown ``config.nibble``."""
    m, k = x.shape
    n = qweight.shape[1]
    groups = zeros.shape[0]
    if (qweight.shape[0] != triton.cdiv(k, 8) or qweight.stride(1) != 1 or x.stride(1) != 1
            or group % 8 or groups * group < k or zeros.shape != scales.shape
            or zeros.shape[1] != n or zeros.stride(1) != 1 or scales.stride(1) != 1):
        raise ValueError(f"w4a16_gemv: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"zeros/scales {tuple(zeros.shape)} with group {group} do not fit")
    cfg = config or choose_w4_config(n, k, m, x.device)
    if cfg.nibble not in (NIBBLE_SUBNORMAL, NIBBLE_EXPONENT):
        raise ValueError(f"w4a16_gemv: unknown nibble decoding {cfg.nibble!r}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    even = n % cfg.block_n == 0 and k % (8 * cfg.block_kw) == 0
    _w4a16_gemv_kernel[(m, triton.cdiv(n, cfg.block_n))](
        x, qweight, zeros, scales, bias if bias is not None else y, y, n, k,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN=even, BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw,
        GROUP_W=group // 8, SUBNORMAL=cfg.nibble == NIBBLE_SUBNORMAL, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_args(x.device))
    return y


#: per (device type, index): whether the compiled GEMV keeps fp32 subnormals
_KEEPS_SUBNORMALS: dict[tuple[str, int | None], bool] = {}


def keeps_subnormals(device: torch.device,
                     gemv: Callable[..., torch.Tensor] = w4a16_gemv) -> bool:
    """Whether ``device``'s compiled kernel keeps fp32 subnormals, so that the subnormal
    decoding is exact. Checked once per device: a ``1 x 256`` by ``256 x 32`` product must
    match the dequantized weight's fp64 product within 1e-5 (a backend that flushes
    subnormals to zero drops nibbles 0..4 and misses by far more; kept on NVIDIA Hopper, not
    yet run on ROCm). Until a device is checked, :func:`choose_w4_config` assumes it keeps
    them. Call it outside graph capture: the linear methods do, when they process a layer's
    weights."""
    key = (device.type, device.index)
    if key not in _KEEPS_SUBNORMALS:
        gen = torch.Generator().manual_seed(0)
        k, n, group = 256, 32, 128
        words = torch.randint(-2**31, 2**31, (k // 8, n), generator=gen,
                              dtype=torch.int64).to(torch.int32)
        zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(torch.float16)
        scales = (torch.rand(k // group, n, generator=gen) / 8 + 0.01).to(torch.float16)
        x = torch.randn(1, k, generator=gen)
        out = gemv(*(t.to(device) for t in (x, words, zeros, scales)), group,
                   config=W4GemvConfig(16, 16, 4, 1, NIBBLE_SUBNORMAL)).double().cpu()
        g = torch.arange(k) // group
        ref = x.double() @ ((unpack_rows(words).double() - zeros.double()[g])
                            * scales.double()[g])
        _KEEPS_SUBNORMALS[key] = ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    return _KEEPS_SUBNORMALS[key]
