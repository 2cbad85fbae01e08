"""Triton fused MoE and top-k softmax routing (contracts: ``FusedMoEOp``, ``TopKSoftmaxOp``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.core.kernels.ops import (
    GRAPH_SAFE_ATTR, MOE_DESCRIBE_ATTR, MOE_SHARED_SLOTS_ATTR, MOE_WEIGHT_SCHEMES_ATTR,
    MoEWeightQuant, check_w4_experts, moe_expert_dims,
)
from heteroserve.platforms.triton.moe_align import align_pairs
from heteroserve.platforms.triton.moe_decode import MAX_DECODE_PAIRS, decode_moe
from heteroserve.platforms.triton.moe_gemm import Config, moe_configs, moe_gemm
from heteroserve.platforms.triton.moe_tuned import describe, tuned_configs
from heteroserve.platforms.triton.moe_gemm_w4 import moe_gemm_w4, w4_configs
from heteroserve.platforms.triton.moe_routing import routing_outputs, store_routing
from heteroserve.platforms.triton.moe_w4 import decode_moe_w4
from heteroserve.platforms.triton.jit_math import select_top_k
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

MAX_EXPERTS = 4096


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, w_ptr, ids_ptr, stride_l, num_experts,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    SHARED: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    wait_for_previous(USE_PDL)  # the logits come from the router projection just before
    valid = offs < num_experts
    x = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf"))
    x = x.to(tl.float32)
    p = tl.where(valid, tl.exp(x - tl.max(x, 0)), 0.0)
    p = p / tl.sum(p, 0)
    weights, ids = select_top_k(tl.where(valid, p, -1.0), p, offs, TOP_K, BLOCK_E, BLOCK_K)
    if RENORM:
        weights = weights / tl.sum(weights, 0)
    store_routing(w_ptr, ids_ptr, row, weights, ids, num_experts, TOP_K, BLOCK_K, SHARED,
                  BLOCK_S)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 shared_experts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> ``(weights fp32 [T, k], ids int32 [T, k])``: the ``k``
    largest fp32 softmax probabilities, descending (ties: lower expert id first), renormalised
    to sum 1 when ``renormalize``; with ``shared_experts = n``, ``[T, k + n]`` whose last
    ``n`` columns are ids ``E .. E + n - 1`` at weight 1.0 (``ops.append_shared_slots``).
    Raises ``ValueError`` unless ``1 <= top_k <= E <= MAX_EXPERTS`` and ``n >= 0``."""
    if router_logits.dim() != 2:
        raise ValueError(f"topk_softmax: logits must be [T, E], got {tuple(router_logits.shape)}")
    t, e = router_logits.shape
    if not 1 <= top_k <= e or e > MAX_EXPERTS:
        raise ValueError(f"top_k must be in 1..{e} (and E <= {MAX_EXPERTS}), got {top_k}")
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights, ids, slots = routing_outputs(t, top_k, shared_experts, logits.device)
    if t:
        _topk_softmax_kernel[(t,)](
            logits, weights, ids, logits.stride(0), e, TOP_K=top_k, RENORM=renormalize,
            BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=1 if e <= 256 else 4, **slots, **pdl_args(logits.device))
    return weights, ids


setattr(topk_softmax, MOE_SHARED_SLOTS_ATTR, True)


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor, quant: MoEWeightQuant | None = None) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe: x must be [T, H], w13 [E, 2I, H] and w2 [E, H, I]")
    if moe_expert_dims(w13, w2, quant)[2] != x.shape[1]:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 "
                         f"{tuple(w2.shape)} disagree")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or \
            topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                         f"{tuple(topk_ids.shape)} must both be [T, k] with T={x.shape[0]}")
    if quant is None and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"fused_moe: weights must be {x.dtype}, got {w13.dtype}/{w2.dtype}")
    if quant is not None:
        _check_quant(quant, w13, w2)


def _check_quant(quant: MoEWeightQuant, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """``w4a16``: the contract's layout (:func:`check_w4_experts`). ``fp8_block``: fp32
    scales of the weights' block grid, ``I`` a multiple of 128 and one weight dtype (fp8
    e4m3fn in the engine; any float dtype computes the same)."""
    if quant.scheme == "w4a16":
        check_w4_experts(quant, w13, w2)
        return
    if quant.scheme != "fp8_block":
        raise ValueError(f"fused_moe: quantized experts {quant.scheme!r} are not supported "
                         "(fp8_block, w4a16)")
    e, two_i, h = w13.shape
    blocks = lambda n: triton.cdiv(n, FP8_BLOCK)  # noqa: E731
    want13, want2 = (e, blocks(two_i), blocks(h)), (e, blocks(h), blocks(two_i // 2))
    if (tuple(quant.w13_scale.shape), tuple(quant.w2_scale.shape)) != (want13, want2) or \
            (two_i // 2) % FP8_BLOCK or w13.dtype != w2.dtype or \
            quant.w13_scale.dtype != torch.float32 or quant.w2_scale.dtype != torch.float32:
        raise ValueError(f"fused_moe: fp8_block scales w13 {tuple(quant.w13_scale.shape)} / "
                         f"w2 {tuple(quant.w2_scale.shape)} ({quant.w13_scale.dtype}) do not "
                         f"fit w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} ({w13.dtype}/"
                         f"{w2.dtype}): expected fp32 {want13} / {want2}, I a multiple of "
                         f"{FP8_BLOCK}")


def _scales(quant: MoEWeightQuant | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two block-scale tensors with a contiguous last dim, or None."""
    if quant is None:
        return None
    return tuple(s if s.stride(2) == 1 else s.contiguous()  # type: ignore[return-value]
                 for s in (quant.w13_scale, quant.w2_scale))


def _contiguous_rows(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three operands with a contiguous last dim (copies only where needed)."""
    return (x if x.stride(1) == 1 else x.contiguous(),
            w13 if w13.stride(2) == 1 else w13.contiguous(),
            w2 if w2.stride(2) == 1 else w2.contiguous())


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              quant: MoEWeightQuant | None = None,
              configs: tuple[Config, Config] | None = None) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * w2[e] @ silu_and_mul(w13[e] @ x[t])`` with
    ``e = topk_ids[t, j]``; ``x [T, H]``, ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (same dtype,
    or with ``quant`` fp8_block: stored fp8 values times their 128x128 block scales, ``x``
    unquantized; with ``quant`` w4a16: the contract's 4-bit words, group scales and zeros).
    Returns ``[T, H]`` in ``x.dtype``. Up to ``MAX_DECODE_PAIRS`` pairs
    (``T * k``) take the decode path
    (:func:`~heteroserve.platforms.triton.moe_decode.decode_moe`, for w4a16
    :func:`~heteroserve.platforms.triton.moe_w4.decode_moe_w4`: two GEMV-style launches,
    no sorting, the sum over ``k`` fused in fp32); more take the grouped GEMM
    (:func:`grouped_moe`), as does any call with ``configs`` (its tiles, for tuning); for
    w4a16 experts the grouped GEMM unpacks and dequantizes each weight tile in registers
    (:func:`~heteroserve.platforms.triton.moe_gemm_w4.moe_gemm_w4`). Neither path
    synchronises with the host. Raises ``ValueError`` on inconsistent shapes or dtypes."""
    pairs = topk_ids.numel()
    if quant is not None and quant.scheme == "w4a16" and configs is None \
            and 0 < pairs <= MAX_DECODE_PAIRS:  # validates what _check would, and more
        return decode_moe_w4(x, w13, w2, topk_weights, topk_ids, quant)
    _check(x, w13, w2, topk_weights, topk_ids, quant)
    t, top_k = topk_ids.shape
    if t == 0 or top_k == 0:
        return torch.zeros_like(x)
    if configs is None and t * top_k <= MAX_DECODE_PAIRS:
        return decode_moe(*_contiguous_rows(x, w13, w2), topk_weights, topk_ids,
                          scales=_scales(quant))
    return grouped_moe(x, w13, w2, topk_weights, topk_ids, quant, configs)


def grouped_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                quant: MoEWeightQuant | None = None,
                configs: tuple[Config, Config] | None = None) -> torch.Tensor:
    """:func:`fused_moe` through two grouped-GEMM launches (SiLU-and-mul fused into the
    first) whatever the pair count, pairs grouped on device by one launch without host sync
    (:func:`~heteroserve.platforms.triton.moe_align.align_pairs`); the per-pair results
    (rounded to ``x.dtype``) are summed over ``k``. Tiles: ``configs`` (tuning; both must
    share ``BLOCK_M``; with fp8_block ``quant`` their ``BLOCK_K`` must divide 128, with
    w4a16 the group), else unquantized experts take the device's tuned table for their
    shape (:func:`~heteroserve.platforms.triton.moe_tuned.tuned_configs`), w4a16 experts
    :func:`~.moe_gemm_w4.w4_configs`, and the rest the heuristic
    :func:`~heteroserve.platforms.triton.moe_gemm.moe_configs`. Raises ``ValueError`` on
    inconsistent shapes."""
    _check(x, w13, w2, topk_weights, topk_ids, quant)
    t, h = x.shape
    e, inter_size, _ = moe_expert_dims(w13, w2, quant)
    top_k = topk_ids.shape[1]
    if t == 0 or top_k == 0:
        return torch.zeros_like(x)
    x, w13, w2 = _contiguous_rows(x, w13, w2)
    w4 = quant is not None and quant.scheme == "w4a16"
    s13, s2 = (None, None) if w4 else (_scales(quant) or (None, None))
    num_pairs = t * top_k
    if configs is None and quant is None:
        configs = tuned_configs(num_pairs, w13.dtype, e, h, inter_size, x.device)
    if configs is None and w4:
        assert quant is not None
        configs = w4_configs(num_pairs, e, quant.group_size, x.device)
    cfg1, cfg2 = configs or moe_configs(num_pairs, e, x.dtype, x.device)
    if cfg1[0] != cfg2[0]:
        raise ValueError("fused_moe: both GEMM configs must share BLOCK_M")
    pairs = align_pairs(topk_ids, e, cfg1[0])
    inter = torch.empty((num_pairs, inter_size), dtype=x.dtype, device=x.device)
    out = torch.empty((num_pairs, h), dtype=x.dtype, device=x.device)
    route = topk_weights.reshape(-1).to(torch.float32).contiguous()
    if w4:
        assert quant is not None and quant.w13_zero is not None and quant.w2_zero is not None
        g = quant.group_size
        moe_gemm_w4(x, w13, quant.w13_scale, quant.w13_zero, g, inter, pairs, top_k, True,
                    None, cfg1)
        moe_gemm_w4(inter, w2, quant.w2_scale, quant.w2_zero, g, out, pairs, 1, False, route,
                    cfg2)
    else:
        moe_gemm(x, w13, inter, pairs, top_k, True, None, cfg1, s13)
        moe_gemm(inter, w2, out, pairs, 1, False, route, cfg2, s2)
    return out.view(t, top_k, h).sum(dim=1)


def describe_experts(w13: torch.Tensor, w2: torch.Tensor) -> str:
    """The start-up line for a layer's experts: the grouped GEMM's tiles
    (:func:`~heteroserve.platforms.triton.moe_tuned.describe`), or for w4a16 experts (int32
    words) the paths they take."""
    if w13.dtype == torch.int32:
        return (f"w4a16 experts: 4-bit decode kernels up to {MAX_DECODE_PAIRS} (token, expert) "
                "pairs; beyond, the grouped GEMM dequantizing each tile in registers")
    return describe(w13, w2)


# no host synchronisation on either path: device graphs may capture it
setattr(fused_moe, GRAPH_SAFE_ATTR, True)
# fp8_block experts (weight-only, block scales) on both paths; w4a16 experts (decode kernels
# of their own, dequantized for the grouped GEMM)
setattr(fused_moe, MOE_WEIGHT_SCHEMES_ATTR, ("fp8_block", "w4a16"))
# the start-up block names the grouped GEMM's tile table (or the heuristic)
setattr(fused_moe, MOE_DESCRIBE_ATTR, describe_experts)
