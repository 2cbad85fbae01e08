"""Attention over the union of two disjoint key sets from each set's result, in one pass.

Given, per query row and head, each set's normalised output ``o_i`` and natural-log
sum-exp ``lse_i`` of its scores, attention over both sets is ``(w_1 o_1 + w_2 o_2) / (w_1 +
w_2)`` with ``w_i = exp(lse_i - max(lse_1, lse_2))``. :func:`merge_attention_into` computes it
in fp32 registers and stores it rounded to the destination's dtype, reading each output
once: cuda's long-extend path (a chunk on a cached prefix as two cuDNN calls) merges with it.
The split-KV decode's :func:`~heteroserve.platforms.triton.attention_decode.decode_reduce_kernel`
merges the same way but reads one fp32 ``[B, H, splits, D]`` buffer with log2 sum-exps per
sequence; feeding it the two cuDNN outputs would first copy both into that buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(o1_ptr, lse1_ptr, o2_ptr, lse2_ptr, out_ptr, n,
                  s_o1h, s_o1t, s_o2h, s_o2t, s_l1h, s_l1t, s_l2h, s_l2t, s_outt, s_outh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    row_mask = rows < n
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    l1 = tl.load(lse1_ptr + h * s_l1h + rows * s_l1t, mask=row_mask, other=0.0)
    l2 = tl.load(lse2_ptr + h * s_l2h + rows * s_l2t, mask=row_mask, other=0.0)
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    inv = 1.0 / (w1 + w2)
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(o1_ptr + h * s_o1h + r64 * s_o1t + cols[None, :], mask=mask, other=0.0)
    b = tl.load(o2_ptr + h * s_o2h + r64 * s_o2t + cols[None, :], mask=mask, other=0.0)
    o = (a.to(tl.float32) * (w1 * inv)[:, None] + b.to(tl.float32) * (w2 * inv)[:, None])
    tl.store(out_ptr + r64 * s_outt + h * s_outh + cols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


def merge_attention_into(out: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor,
                         o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Fill ``out [n, H, D]`` (rows of any stride, last dim contiguous) with the merge of
    ``o1``/``o2 [H, n, D]`` (any float dtype, last dim contiguous) by their fp32 natural-log
    sum-exps ``lse1``/``lse2 [H, n]`` (any strides); returns ``out``. A row whose two
    sum-exps are both ``-inf`` (no key in either set) comes out NaN. One launch; no
    synchronisation. Raises ``ValueError`` on mismatched shapes or strides it cannot take."""
    heads, n, d = o1.shape
    if o2.shape != o1.shape or out.shape != (n, heads, d) or \
            lse1.shape != (heads, n) or lse2.shape != (heads, n):
        raise ValueError(f"merge_attention_into: out {tuple(out.shape)}, o1 {tuple(o1.shape)}, "
                         f"o2 {tuple(o2.shape)}, lse {tuple(lse1.shape)} / {tuple(lse2.shape)}")
    if any(t.stride(-1) != 1 for t in (out, o1, o2)):
        raise ValueError("merge_attention_into: last dims must be contiguous")
    if lse1.dtype != torch.float32 or lse2.dtype != torch.float32:
        raise ValueError("merge_attention_into: lse1 / lse2 must be float32")
    if n == 0:
        return out
    block_t = 32
    _merge_kernel[(triton.cdiv(n, block_t), heads)](
        o1, lse1, o2, lse2, out, n, o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
        lse1.stride(0), lse1.stride(1), lse2.stride(0), lse2.stride(1), out.stride(0),
        out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_T=block_t, num_warps=4)
    return out
