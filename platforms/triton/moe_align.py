"""Group (token, expert) pairs by expert and pad each group to the GEMM's row block.

One Triton program does it all (:func:`align_pairs`; up to 49,152 pairs, beyond which the
torch operations are faster), with no host synchronisation, so fused MoE can be captured in a
device graph: buffers are sized for the worst case, and a device counter says how many padded
rows are real. It replaced fourteen torch launches (a scatter count, two cumsums, a sort,
gathers, a searchsorted: :func:`align_pairs_torch`, kept as the reference and for larger
counts), which took 52-89 us a call on an H100 at decode batch sizes (16-512 tokens of eight
experts), a sixth of the grouped path, against 7-17 us.

Within an expert's run the pairs' order is unspecified (the program places them with
atomic counters). That does not change any result: each row of the grouped GEMM is
reduced over ``K`` alone, in an order that does not depend on its position in the tile, so
the product of a pair is the same bits wherever its row lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

#: pairs a program step reads at once
_CHUNK = 1024
#: above this many pairs the torch operations are faster than the one program, which places
#: every pair itself (H100, 2026-12-06, ``results/h100-20261206-0134-moe_tune.json``: 90 against
#: 129 us at 32,768 pairs, 172 against 141 us at 65,536)
ALIGN_KERNEL_MAX_PAIRS = 49152


@dataclass(frozen=True)
class AlignedPairs:
    """Pairs sorted by expert, each expert's run padded to a multiple of ``block_m``.

    ``sorted_ids`` int32 ``[max_rows]``: pair index ``t * top_k + j`` per row, or
    ``num_pairs`` for padding; ``block_experts`` int32 ``[max_rows // block_m]``: the expert of
    each row block (blocks past the end hold ``num_experts``); ``num_rows`` int32 ``[1]``: how
    many leading rows (a multiple of ``block_m``) belong to some expert. ``max_rows`` is
    :func:`max_rows`, a multiple of ``block_m``.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    num_rows: torch.Tensor
    num_pairs: int
    block_m: int


def max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the worst case: every touched expert's run padded by ``block_m - 1``."""
    rows = num_pairs + min(num_experts, max(num_pairs, 1)) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


@triton.jit
def _align_kernel(ids_ptr, scratch_ptr, sorted_ptr, blocks_ptr, num_rows_ptr, n, num_experts,
                  max_rows, BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_B: tl.constexpr):
    # scratch: counts [BINS] then cursors [BINS]; bins >= num_experts stay empty
    bins = tl.arange(0, BINS)
    offs = tl.arange(0, CHUNK)
    tl.store(scratch_ptr + bins, tl.zeros([BINS], dtype=tl.int32))
    tl.debug_barrier()
    for start in range(0, n, CHUNK):
        m = start + offs < n
        e = tl.load(ids_ptr + start + offs, mask=m, other=0).to(tl.int32)
        tl.atomic_add(scratch_ptr + e, 1, mask=m, sem="relaxed")  # ordered by the barriers
    tl.debug_barrier()
    counts = tl.load(scratch_ptr + bins, cache_modifier=".cg")  # the atomics' totals, from L2
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, 0)
    pad_start = pad_end - padded
    tl.store(scratch_ptr + BINS + bins, pad_start)
    tl.store(num_rows_ptr, tl.sum(padded, 0))
    # a block's expert: how many experts' runs end at or before its first row (searchsorted)
    for b0 in range(0, max_rows // BLOCK_M, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        ended = (pad_end[None, :] <= (blk * BLOCK_M)[:, None]) & (bins < num_experts)[None, :]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), 1), num_experts)
        tl.store(blocks_ptr + blk, expert, mask=blk < max_rows // BLOCK_M)
    for r0 in range(0, max_rows, CHUNK):
        tl.store(sorted_ptr + r0 + offs, tl.full([CHUNK], 0, tl.int32) + n,
                 mask=r0 + offs < max_rows)
    tl.debug_barrier()
    for start in range(0, n, CHUNK):
        m = start + offs < n
        e = tl.load(ids_ptr + start + offs, mask=m, other=0).to(tl.int32)
        row = tl.atomic_add(scratch_ptr + BINS + e, 1, mask=m, sem="relaxed")
        tl.store(sorted_ptr + row, start + offs, mask=m)


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Sort the pairs of ``topk_ids [T, k]`` (ints in ``[0, E)``) by expert and pad each
    expert's run to a multiple of ``block_m``, in one launch (above
    :data:`ALIGN_KERNEL_MAX_PAIRS` pairs through :func:`align_pairs_torch`); the order within
    a run is unspecified (see the module). Ids outside ``[0, E)`` are not checked (that would
    need a host sync); they must not occur."""
    if topk_ids.numel() > ALIGN_KERNEL_MAX_PAIRS:
        return align_pairs_torch(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    rows = max_rows(n, num_experts, block_m)
    bins = triton.next_power_of_2(num_experts)
    scratch = torch.empty(2 * bins, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    block_experts = torch.empty(rows // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    # the [BLOCK_B, BINS] comparison stays at 8K elements
    block_b = max(1, min(256, 8192 // bins))
    _align_kernel[(1,)](flat, scratch, sorted_ids, block_experts, num_rows, n, num_experts,
                        rows, BLOCK_M=block_m, BINS=bins, CHUNK=_CHUNK, BLOCK_B=block_b,
                        num_warps=4)
    return AlignedPairs(sorted_ids, block_experts, num_rows, n, block_m)


def align_pairs_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """:func:`align_pairs` in torch operations (the reference; stable: pairs keep their
    order within a run), the same buffer sizes."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices
    expert_of = flat[order]
    rank = torch.arange(n, device=device) - count_start[expert_of]
    rows = max_rows(n, num_experts, block_m)
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=device)
    sorted_ids[pad_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, rows, block_m, device=device)
    block_experts = torch.searchsorted(pad_end, block_starts, right=True).to(torch.int32)
    return AlignedPairs(sorted_ids, block_experts, pad_end[-1:].to(torch.int32), n, block_m)
