"""Torch-native MoE routing and experts (contracts in ``core/kernels/ops.py``).

``fused_moe`` groups the (token, expert) pairs by expert and runs one GEMM pair per expert
that received tokens; it never computes experts densely. Grouping needs the per-expert counts
on the host, so it costs one device-to-host copy of ``E`` integers per call.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.core.kernels.ops import (
    MOE_SHARED_SLOTS_ATTR, MOE_WEIGHT_SCHEMES_ATTR, MoEWeightQuant, append_shared_slots,
    check_w4_experts, dequantize_w4_experts, moe_expert_dims,
)
from heteroserve.platforms.cpu.activation import silu_and_mul

_SCORINGS = ("softmax", "sigmoid")


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")


def _topk_desc(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along the last dim, descending, lower index first on ties."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 shared_experts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> ``(weights fp32 [T, k], ids int32 [T, k])``: the ``k``
    largest fp32 softmax probabilities, descending (ties: lower expert id first), renormalised
    to sum 1 when ``renormalize``; then ``shared_experts`` slots (``append_shared_slots``).
    Raises ``ValueError`` unless ``1 <= top_k <= E`` and ``shared_experts >= 0``."""
    _check_top_k(top_k, router_logits.shape[-1])
    probs = torch.softmax(router_logits.to(torch.float32), dim=-1)
    weights, ids = _topk_desc(probs, top_k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return append_shared_slots(weights, ids.to(torch.int32), router_logits.shape[-1],
                               shared_experts)


def check_grouped_topk(num_experts: int, top_k: int, num_expert_group: int, topk_group: int,
                       scoring: str, correction_bias: torch.Tensor | None) -> int:
    """Experts per group of a valid ``GroupedTopKOp`` call; ``ValueError`` naming what is
    wrong otherwise (scoring, group split, ``topk_group``, ``top_k``, bias shape)."""
    if scoring not in _SCORINGS:
        raise ValueError(f"grouped_topk: scoring must be one of {_SCORINGS}, got {scoring!r}")
    if num_expert_group < 1 or num_experts % num_expert_group:
        raise ValueError(f"grouped_topk: {num_experts} experts do not split into "
                         f"{num_expert_group} equal groups")
    if not 1 <= topk_group <= num_expert_group:
        raise ValueError(f"grouped_topk: topk_group must be in 1..{num_expert_group}, "
                         f"got {topk_group}")
    per_group = num_experts // num_expert_group
    _check_top_k(top_k, topk_group * per_group)
    if correction_bias is not None and correction_bias.shape != (num_experts,):
        raise ValueError(f"grouped_topk: correction_bias must be [{num_experts}], "
                         f"got {tuple(correction_bias.shape)}")
    return per_group


def grouped_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 num_expert_group: int, topk_group: int, scoring: str = "softmax",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0,
                 shared_experts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style group-limited routing (see ``GroupedTopKOp``).

    ``router_logits [T, E]``; scores are fp32 softmax or sigmoid; ``correction_bias [E]``
    biases selection only. Groups are ranked by their max score, or with a bias by the sum of
    their two best biased scores; experts outside the best ``topk_group`` groups are excluded;
    the ``top_k`` best remaining (by biased score, ties to the lower id) are weighted by their
    unbiased score, optionally renormalised, then scaled by ``routed_scaling_factor``.
    Returns ``(weights fp32 [T, k], ids int32 [T, k])`` in descending biased-score order,
    then ``shared_experts`` slots (``append_shared_slots``: ``[T, k + n]``). Raises
    ``ValueError`` for an unknown scoring, ``E`` not divisible by the group count,
    ``top_k`` / ``topk_group`` out of range, or a negative ``shared_experts``.
    """
    num_tokens, num_experts = router_logits.shape
    per_group = check_grouped_topk(num_experts, top_k, num_expert_group, topk_group, scoring,
                                   correction_bias)
    logits = router_logits.to(torch.float32)
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    if correction_bias is None:
        choice = scores
        group_scores = choice.view(num_tokens, num_expert_group, per_group).amax(dim=-1)
    else:
        choice = scores + correction_bias.to(torch.float32)
        best2 = _topk_desc(choice.view(num_tokens, num_expert_group, per_group),
                           min(2, per_group))[0]
        group_scores = best2.sum(dim=-1)
    group_ids = _topk_desc(group_scores, topk_group)[1]
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_keep = group_keep.repeat_interleave(per_group, dim=1)
    choice = choice.masked_fill(~expert_keep, float("-inf"))
    ids = _topk_desc(choice, top_k)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return append_shared_slots(weights, ids.to(torch.int32), num_experts, shared_experts)


setattr(topk_softmax, MOE_SHARED_SLOTS_ATTR, True)
setattr(grouped_topk, MOE_SHARED_SLOTS_ATTR, True)


def _check_quant(quant: MoEWeightQuant, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """``ValueError`` unless ``quant`` is ``fp8_block`` with scales matching the weights or
    ``w4a16`` experts as the contract lays them out."""
    if quant.scheme == "w4a16":
        check_w4_experts(quant, w13, w2)
        return
    if quant.scheme != "fp8_block":
        raise ValueError(f"fused_moe: quantized experts {quant.scheme!r} are not supported "
                         "(fp8_block, w4a16)")
    e, two_i, h = w13.shape
    blocks = lambda n: -(-n // FP8_BLOCK)  # noqa: E731
    want13, want2 = (e, blocks(two_i), blocks(h)), (e, blocks(h), blocks(two_i // 2))
    if tuple(quant.w13_scale.shape) != want13 or tuple(quant.w2_scale.shape) != want2 or \
            (two_i // 2) % FP8_BLOCK:
        raise ValueError(f"fused_moe: fp8_block scales w13 {tuple(quant.w13_scale.shape)} / "
                         f"w2 {tuple(quant.w2_scale.shape)} do not fit w13 {tuple(w13.shape)} "
                         f"and w2 {tuple(w2.shape)} (expected {want13} / {want2}, I a "
                         f"multiple of {FP8_BLOCK})")


def _dequantize_block(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``w [N, K] * scale[n // 128, k // 128]``."""
    n, k = w.shape
    full = scale.to(torch.float32).repeat_interleave(FP8_BLOCK, 0)
    return w.to(torch.float32) * full.repeat_interleave(FP8_BLOCK, 1)[:n, :k]


def _dequantized(quant: MoEWeightQuant, w13: torch.Tensor, w2: torch.Tensor, expert: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(W13, W2)`` of one quantized expert."""
    if quant.scheme == "w4a16":
        assert quant.w13_zero is not None and quant.w2_zero is not None  # checked
        return (dequantize_w4_experts(w13[expert], quant.w13_scale[expert],
                                      quant.w13_zero[expert], quant.group_size),
                dequantize_w4_experts(w2[expert], quant.w2_scale[expert],
                                      quant.w2_zero[expert], quant.group_size))
    return (_dequantize_block(w13[expert], quant.w13_scale[expert]),
            _dequantize_block(w2[expert], quant.w2_scale[expert]))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              quant: MoEWeightQuant | None = None) -> torch.Tensor:
    """SiLU-gated mixture of experts (see ``FusedMoEOp``).

    ``x [T, H]``, ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (``w4a16``: last dims packed eight
    a word), ``topk_weights [T, k]``, ``topk_ids [T, k]`` in ``[0, E)``.
    Expert GEMMs run in the weights' dtype; with ``quant`` (``fp8_block``, ``w4a16``) each
    touched expert is dequantized to fp32 and its GEMMs run in fp32. The weighted sum
    accumulates in fp32; the result is ``[T, H]`` in ``x.dtype``. Raises ``ValueError`` on
    inconsistent shapes or an unsupported ``quant``.
    """
    num_tokens, hidden = x.shape
    num_experts, inter, w13_hidden = moe_expert_dims(w13, w2, quant)
    if (w13_hidden != hidden or topk_ids.shape != topk_weights.shape
            or topk_ids.shape[0] != num_tokens):
        raise ValueError(f"fused_moe: inconsistent shapes x {tuple(x.shape)}, w13 "
                         f"{tuple(w13.shape)}, w2 {tuple(w2.shape)}, topk_weights "
                         f"{tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}")
    if quant is not None:
        _check_quant(quant, w13, w2)
    out = torch.zeros((num_tokens, hidden), dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out.to(x.dtype)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).to(torch.long)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    weight_of = topk_weights.reshape(-1).to(torch.float32)[order]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    if len(counts) > num_experts:
        raise ValueError(f"fused_moe: topk_ids reach expert {len(counts) - 1}, but there are "
                         f"only {num_experts} experts")
    xw = x.to(w13.dtype if quant is None else torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start:start + count]
        if quant is None:
            up, down = w13[expert], w2[expert]
        else:
            up, down = _dequantized(quant, w13, w2, expert)
        h = torch.nn.functional.linear(xw.index_select(0, rows), up)
        y = torch.nn.functional.linear(silu_and_mul(h), down)
        out.index_add_(0, rows, y.to(torch.float32) * weight_of[start:start + count, None])
        start += count
    return out.to(x.dtype)


setattr(fused_moe, MOE_WEIGHT_SCHEMES_ATTR, ("fp8_block", "w4a16"))
