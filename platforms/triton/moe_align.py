"""Group (token, expert) pairs by expert and pad each group to the GEMM's row block.

Pure torch on the device, with no host synchronisation (so fused MoE can be captured in a
device graph): buffers are sized for the worst case, and a device counter says how many
padded rows are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedPairs:
    """Pairs sorted by expert, each expert's run padded to a multiple of ``block_m``.

    ``sorted_ids`` int32 ``[max_rows]``: pair index ``t * top_k + j`` per row, or
    ``num_pairs`` for padding; ``block_experts`` int32 ``[max_rows // block_m]``: the expert of
    each row block (blocks past the end hold ``num_experts``); ``num_rows`` int32 ``[1]``: how
    many leading rows (a multiple of ``block_m``) belong to some expert.
    """

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    num_rows: torch.Tensor
    num_pairs: int
    block_m: int


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Sort the pairs of ``topk_ids [T, k]`` (ints in ``[0, E)``) by expert, stably, and pad
    each expert's run to a multiple of ``block_m``. Ids outside ``[0, E)`` are not checked
    (that would need a host sync); they must not occur."""
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
    max_rows = (n + min(num_experts, max(n, 1)) * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_rows,), n, dtype=torch.int32, device=device)
    sorted_ids[pad_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_experts = torch.searchsorted(pad_end, block_starts, right=True).to(torch.int32)
    return AlignedPairs(sorted_ids, block_experts, pad_end[-1:].to(torch.int32), n, block_m)
