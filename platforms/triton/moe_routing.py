"""Triton DeepSeek-style grouped top-k routing (contract: ``GroupedTopKOp``): one program per
token row, every step of the reference (``platforms/cpu/moe.py``) in registers, one launch
with PDL in place of the fifteen-odd torch kernels of the reference.

Per row: scores (fp32 softmax or sigmoid of the logits); the choice score (plus
``correction_bias`` when given); each group's score (its best choice score, or with a bias
the sum of its two best); the ``topk_group`` best groups (ties to the lower group); the
``top_k`` best choice scores among their experts (ties to the lower expert id), weighted by
their unbiased scores, optionally renormalised, times ``routed_scaling_factor``. Groups are
contiguous runs of ``E / G`` experts of any size (DeepSeek-V2's 160 experts in 8 groups of
20), so they are found by ``expert // per_group``, not by a reshape. Both routing kernels
(this one and ``moe.topk_softmax``'s) end in :func:`store_routing`, which can append
DeepSeek's shared-expert slots to each row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR, MOE_SHARED_SLOTS_ATTR
from heteroserve.platforms.cpu.moe import check_grouped_topk
from heteroserve.platforms.triton.jit_math import select_top_k
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

MAX_EXPERTS = 4096


@triton.jit
def store_routing(w_ptr, ids_ptr, row, weights, ids, num_experts, TOP_K: tl.constexpr,
                  BLOCK_K: tl.constexpr, SHARED: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row ``row`` of the ``[T, TOP_K + SHARED]`` routing outputs: the chosen ``weights`` /
    ``ids`` (``[BLOCK_K]``, the first ``TOP_K`` valid), then ``SHARED`` slots holding ids
    ``num_experts + j`` at weight 1.0."""
    width = TOP_K + SHARED
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < TOP_K
    tl.store(w_ptr + row * width + kk, weights, mask=k_mask)
    tl.store(ids_ptr + row * width + kk, ids, mask=k_mask)
    if SHARED > 0:
        ss = tl.arange(0, BLOCK_S)
        s_mask = ss < SHARED
        tl.store(w_ptr + row * width + TOP_K + ss, tl.full([BLOCK_S], 1.0, tl.float32),
                 mask=s_mask)
        tl.store(ids_ptr + row * width + TOP_K + ss, (num_experts + ss).to(tl.int32),
                 mask=s_mask)


def routing_outputs(t: int, top_k: int, shared_experts: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``(weights fp32, ids int32)`` of ``[t, top_k + shared_experts]`` and the
    ``SHARED`` / ``BLOCK_S`` launch constants of :func:`store_routing`. Raises
    ``ValueError`` for a negative ``shared_experts``."""
    if shared_experts < 0:
        raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
    width = top_k + shared_experts
    return (torch.empty((t, width), dtype=torch.float32, device=device),
            torch.empty((t, width), dtype=torch.int32, device=device),
            {"SHARED": shared_experts, "BLOCK_S": triton.next_power_of_2(max(shared_experts, 1))})


@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, num_experts, scale,
    PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr, SHARED: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    if HAS_BIAS:  # a parameter: no kernel of the step writes it
        bias = tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    wait_for_previous(USE_PDL)  # the logits come from the router projection just before
    x = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf"))
    x = x.to(tl.float32)
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = tl.where(valid, tl.exp(x - tl.max(x, 0)), 0.0)
        scores = p / tl.sum(p, 0)
    choice = scores
    if HAS_BIAS:
        choice = scores + bias
    choice = tl.where(valid, choice, float("-inf"))
    group = offs // PER_GROUP
    offs_g = tl.arange(0, BLOCK_G)
    group_score = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for g in tl.static_range(GROUPS):
        in_g = tl.where(group == g, choice, float("-inf"))
        best = tl.max(in_g, 0)
        if HAS_BIAS:  # the sum of the group's two best (one when a group holds one expert)
            first = tl.min(tl.where(in_g == best, offs, BLOCK_E), 0)
            second = tl.max(tl.where(offs == first, float("-inf"), in_g), 0)
            if PER_GROUP > 1:
                best = best + second
        group_score = tl.where(offs_g == g, best, group_score)
    keep = offs < 0  # all False
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(group_score, 0)
        g_idx = tl.min(tl.where(group_score == best, offs_g, BLOCK_G), 0)
        keep = keep | (group == g_idx)
        group_score = tl.where(offs_g == g_idx, float("-inf"), group_score)
    weights, ids = select_top_k(tl.where(keep & valid, choice, float("-inf")), scores, offs,
                                TOP_K, BLOCK_E, BLOCK_K)
    if RENORM:
        weights = weights / tl.sum(weights, 0)
    store_routing(w_ptr, ids_ptr, row, weights * scale, ids, num_experts, TOP_K, BLOCK_K,
                  SHARED, BLOCK_S)


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 num_expert_group: int, topk_group: int, scoring: str = "softmax",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0,
                 shared_experts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> ``(weights fp32 [T, k], ids int32 [T, k])`` as
    ``GroupedTopKOp`` (module docstring), in descending choice-score order; with
    ``shared_experts = n``, ``[T, k + n]`` (``ops.append_shared_slots``). Raises
    ``ValueError`` as the reference does, or for more than :data:`MAX_EXPERTS` experts."""
    if router_logits.dim() != 2:
        raise ValueError(f"grouped_topk: logits must be [T, E], got "
                         f"{tuple(router_logits.shape)}")
    t, e = router_logits.shape
    if e > MAX_EXPERTS:
        raise ValueError(f"grouped_topk: at most {MAX_EXPERTS} experts, got {e}")
    per_group = check_grouped_topk(e, top_k, num_expert_group, topk_group, scoring,
                                   correction_bias)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights, ids, slots = routing_outputs(t, top_k, shared_experts, logits.device)
    if t:
        bias = correction_bias.contiguous() if correction_bias is not None else weights
        _grouped_topk_kernel[(t,)](
            logits, bias, weights, ids, logits.stride(0), e, float(routed_scaling_factor),
            PER_GROUP=per_group, GROUPS=num_expert_group, TOPK_GROUP=topk_group, TOP_K=top_k,
            SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
            RENORM=renormalize, BLOCK_E=triton.next_power_of_2(e),
            BLOCK_G=triton.next_power_of_2(num_expert_group),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if e <= 256 else 4,
            **slots, **pdl_args(logits.device))
    return weights, ids


setattr(grouped_topk, GRAPH_SAFE_ATTR, True)
setattr(grouped_topk, MOE_SHARED_SLOTS_ATTR, True)
