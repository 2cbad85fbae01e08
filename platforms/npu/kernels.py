"""Function ops on Ascend through torch_npu's fused operators.

Each function follows its contract in ``core/kernels/ops.py``; the torch_npu call it makes is
written in its docstring with the argument names and layouts torch_npu documents.
"""

from __future__ import annotations

import torch

from heteroserve.platforms.npu.platform import _torch_npu

_npu = _torch_npu()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``torch_npu.npu_rms_norm(x [T, H], gamma=weight [H], epsilon=eps)`` -> ``(y, rstd)``;
    returns ``y`` (``x.dtype``; rstd is fp32 and unused)."""
    out, _ = _npu.npu_rms_norm(x, weight, epsilon=eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_add_rms_norm(x1=x, x2=residual, gamma=weight, epsilon=eps)`` ->
    ``(y, rstd, x1 + x2)``; returns ``(y, x1 + x2)``. Out of place."""
    out, _, summed = _npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return out, summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``torch_npu.npu_swiglu(x [T, 2I], dim=-1)``: ``silu(x[:, :I]) * x[:, I:]``."""
    return _npu.npu_swiglu(x, dim=-1)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_rotary_mul(x, r1=cos, r2=sin, rotary_mode=...)`` on the first ``R``
    dims of every head, in fp32, layout BSND: ``x [1, T, heads, R]``, ``r1/r2 [1, T, 1, R]``
    (``1S1D``, the layout both modes accept). ``rotary_mode="half"`` with
    ``r1 = [cos | cos]`` for NeoX style; ``"interleave"`` with each cos repeated twice for
    GPT-J style. Returns new ``(q, k)``; the pass-through dims are copied unchanged."""
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    cs = cos_sin_cache.index_select(0, positions.to(torch.long)).to(torch.float32)
    cos, sin = cs[:, :half], cs[:, half:]
    if is_neox:
        cos, sin, mode = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), "half"
    else:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        mode = "interleave"
    r1, r2 = cos[None, :, None, :], sin[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        head = x[..., :rot].to(torch.float32).unsqueeze(0).contiguous()
        out = _npu.npu_rotary_mul(head, r1, r2, rotary_mode=mode)[0].to(x.dtype)
        return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), -1)

    return rotate(q), rotate(k)


def topk_softmax(router_logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch_npu.npu_moe_gating_top_k_softmax(x=fp32 [T, E], finished=None, k=top_k)`` ->
    ``(y [T, k], expert_idx int32 [T, k], row_idx int32 [T, k])``; renormalisation, which the
    operator does not do, follows in torch."""
    weights, ids, _ = _npu.npu_moe_gating_top_k_softmax(
        router_logits.to(torch.float32), finished=None, k=top_k)
    weights = weights.to(torch.float32)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Ascend's routed-expert pipeline (the one vLLM-Ascend and SGLang's NPU path use):

    1. ``npu_moe_init_routing(x [T, H], row_idx=int32 [T, k] (row_idx[t, j] = j*T + t),
       expert_idx=int32 [T, k], active_num=T)`` -> ``(expanded_x [T*k, H] sorted by expert,
       expanded_row_idx int32 [T*k], expanded_expert_idx int32 [T*k])``;
    2. ``npu_moe_compute_expert_tokens(expanded_expert_idx, E)`` -> cumulative rows per expert
       (cast to int64: ``group_list_type=0``);
    3. ``npu_grouped_matmul(x=[expanded_x], weight=[w13^T as [E, H, 2I]], split_item=2,
       group_list_type=0, group_type=0, group_list=...)`` -> ``[gate|up]`` rows;
    4. ``npu_swiglu(.., dim=-1)``; 5. the second grouped matmul with ``w2^T [E, I, H]``;
    6. ``npu_moe_finalize_routing(expanded_permuted_rows, skip1=None, skip2=None, bias=None,
       scales=topk_weights in x.dtype [T, k], expanded_src_to_dst_row=expanded_row_idx,
       expert_for_source_row=topk_ids)`` (positional; drop_pad_mode 0: column order) ->
       ``[T, H]``.
    """
    tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    ids = topk_ids.to(torch.int32).contiguous()  # may be a strided view (op contract)
    row_idx = torch.arange(tokens * top_k, dtype=torch.int32, device=x.device)
    row_idx = row_idx.view(top_k, tokens).t().contiguous()
    expanded_x, expanded_row_idx, expanded_expert_idx = _npu.npu_moe_init_routing(
        x, row_idx=row_idx, expert_idx=ids, active_num=tokens)
    group_list = _npu.npu_moe_compute_expert_tokens(expanded_expert_idx, num_experts)
    group_list = group_list.to(torch.int64)
    gate_up = _npu.npu_grouped_matmul(
        x=[expanded_x], weight=[w13.transpose(1, 2)], split_item=2, group_list_type=0,
        group_type=0, group_list=group_list)[0]
    act = _npu.npu_swiglu(gate_up, dim=-1)
    down = _npu.npu_grouped_matmul(
        x=[act], weight=[w2.transpose(1, 2)], split_item=2, group_list_type=0,
        group_type=0, group_list=group_list)[0]
    return _npu.npu_moe_finalize_routing(
        down, None, None, None, topk_weights.to(x.dtype).contiguous(), expanded_row_idx, ids)
