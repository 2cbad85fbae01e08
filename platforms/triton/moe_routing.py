"""Triton DeepSeek-style grouped top-k routing (contract: ``GroupedTopKOp``): one program per
token row, every step of the reference (``platforms/cpu/moe.py``) in registers, one launch
with PDL in place of the fifteen-odd torch kernels of the reference.

Per row: scores (fp32 softmax or sigmoid of the logits); the choice score (plus
``correction_bias`` when given); each group's score (its best choice score, or with a bias
the sum of its two best); the ``topk_group`` best groups (ties to the lower group); the
``top_k`` best choice scores among their experts (ties to the lower expert id), weighted by
their unbiased scores, optionally renormalised, times ``routed_scaling_factor``. Groups are
contiguous runs of ``E / G`` experts of any size (DeepSeek-V2's 160 experts in 8 groups of
20), so they are found by ``expert // per_group``, not by a reshape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR
from heteroserve.platforms.cpu.moe import check_grouped_topk
from heteroserve.platforms.triton.jit_math import select_top_k
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

MAX_EXPERTS = 4096


@triton.jit
def _grouped_topk_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, num_experts, scale,
    PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
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
    kk = tl.arange(0, BLOCK_K)
    if RENORM:
        weights = weights / tl.sum(weights, 0)
    weights = weights * scale
    k_mask = kk < TOP_K
    tl.store(w_ptr + row * TOP_K + kk, weights, mask=k_mask)
    tl.store(ids_ptr + row * TOP_K + kk, ids, mask=k_mask)


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 num_expert_group: int, topk_group: int, scoring: str = "softmax",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> ``(weights fp32 [T, k], ids int32 [T, k])`` as
    ``GroupedTopKOp`` (module docstring), in descending choice-score order. Raises
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
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t:
        bias = correction_bias.contiguous() if correction_bias is not None else weights
        _grouped_topk_kernel[(t,)](
            logits, bias, weights, ids, logits.stride(0), e, float(routed_scaling_factor),
            PER_GROUP=per_group, GROUPS=num_expert_group, TOPK_GROUP=topk_group, TOP_K=top_k,
            SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
            RENORM=renormalize, BLOCK_E=triton.next_power_of_2(e),
            BLOCK_G=triton.next_power_of_2(num_expert_group),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if e <= 256 else 4,
            **pdl_args(logits.device))
    return weights, ids


setattr(grouped_topk, GRAPH_SAFE_ATTR, True)
