"""How the W8A8 linears call cuBLASLt's scaled fp8 GEMM (``torch._scaled_mm``): fast
accumulation per scheme, and the orientation of the block-scaled product.

Both knobs are off by default, by measurement. The reason to try them was an H100
measurement at 8192 rows (``benchmarks/results/h100-20261207-0939-fp8_block_tiles.json``): the
block-scaled GEMM ran 0.85x bf16 at ``o_proj`` and 0.93x at ``down_proj`` (the layers with 4096
outputs) against 1.10x / 1.49x at the wider ``qkv_proj`` / ``gate_up_proj``. Offline on an
H100 (``benchmarks/results/h100-20261207-1026-fp8mm_ab-*``, 256 x (1024/256)): fast
accumulation left per-tensor fp8 at 36,240 against 36,665 total tok/s, and the weight-first
block product below 4096 outputs took fp8-block from 32,161 to 30,069.

- :data:`FAST_ACCUM`: per-tensor / per-channel schemes whose calls pass
  ``use_fast_accum=True`` (Hopper's fp8 MMA then keeps fewer accumulator bits between
  promotions). Never the block-scaled product: ``torch._scaled_mm`` raises "doesn't support
  fast accum with 128x128 blockwise scaling" (torch 2.11, H100), and block scales promote
  every 128 columns anyway; :func:`fast_accum` answers False for ``fp8_block``.
- :data:`BLOCK_SWAP_MAX_N`: fp8-block products of at most this many outputs run as
  ``(W @ x^T)^T``, the weight (128x128 block scales) as the left operand and the activation
  (1x128 group scales) as the right one, a pairing cuBLASLt also offers; the ``[N, M]``
  result is transposed back into a contiguous ``[M, N]``. 0: never.

Scale layouts ``torch._scaled_mm`` checks (an operand ``t`` of the left side, or the
transpose of the right side, and its scale ``s``): 1x128 is ``s [rows(t), ceil(K / 128)]``
with strides ``(1, rows(t))`` (group-major); 128x128 is ``s [ceil(rows(t) / 128), ceil(K /
128)]``, row-major. The right side's scale is passed transposed.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton.quant import quantize_rows

#: the schemes whose cuBLASLt call accepts fast accumulation (not the block-scaled one)
FAST_ACCUM_SCHEMES = ("fp8_per_channel", "fp8_per_tensor")
#: schemes (of FAST_ACCUM_SCHEMES) whose cuBLASLt fp8 calls use fast accumulation
FAST_ACCUM: set[str] = set()
#: fp8-block products of at most this many outputs run weight-first (see the module); 0: never
BLOCK_SWAP_MAX_N = 0


def fast_accum(scheme: str) -> bool:
    """Whether ``scheme``'s cuBLASLt calls pass ``use_fast_accum=True``: it is in
    :data:`FAST_ACCUM` and in :data:`FAST_ACCUM_SCHEMES` (always False for ``fp8_block``)."""
    return scheme in FAST_ACCUM and scheme in FAST_ACCUM_SCHEMES


def swaps(n: int) -> bool:
    """Whether an fp8-block product of ``n`` outputs runs weight-first
    (``n <= BLOCK_SWAP_MAX_N``)."""
    return n <= BLOCK_SWAP_MAX_N


def block_scaled_mm(x2: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                    fmax: float, out_dtype: torch.dtype, swap: bool | None = None
                    ) -> torch.Tensor:
    """``x2 [M, K]`` (16-bit) times the fp8 ``weight [N, K]`` with 128x128 block scales
    ``w_scale [N / 128, K / 128]`` (fp32, row-major; ``N`` and ``K`` multiples of 128) ->
    ``[M, N]`` in ``out_dtype``, contiguous: ``x2`` quantized per token and 128-column group
    (e4m3 max ``fmax``), then one cuBLASLt block-scaled GEMM. ``swap`` (None:
    :func:`swaps`) computes it weight-first. Raises what ``torch._scaled_mm``
    raises for a layout its cuBLASLt lacks (callers probe first: ``scaled_mm_supports``)."""
    m = x2.shape[0]
    n = weight.shape[0]
    if swap is None:
        swap = swaps(n)
    if swap:
        # the activation becomes the right operand: its row count is cuBLASLt's N, a multiple
        # of 16; its 1x128 scales are checked on q against s (strides (1, rows)), passed as s^T
        q, x_scale = quantize_rows(x2, weight.dtype, fmax, FP8_BLOCK, group_major=True,
                                   row_multiple=16)
        y_t = torch._scaled_mm(weight, q.t(), scale_a=w_scale, scale_b=x_scale.t(),
                               out_dtype=out_dtype)
        return y_t[:, :m].t().contiguous()
    # cuBLASLt refuses 1x128 scales whose column stride (M) is not 16-byte aligned: quantize
    # into 4-row-aligned buffers and drop the padding rows of the product
    q, x_scale = quantize_rows(x2, weight.dtype, fmax, FP8_BLOCK, group_major=True,
                               row_multiple=4)
    return torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=w_scale.t(),
                            out_dtype=out_dtype)[:m]
