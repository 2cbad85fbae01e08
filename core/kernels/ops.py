"""Every op of the kernel interface: its name, call signature and contract.

An op is either a plain function (norms, activations, rotary, MoE, sampling, bitmask) or a
class the engine instantiates once (attention and MLA backends, linear methods). Implementations are
registered per op in the :mod:`~heteroserve.core.kernels.registry`; the engine resolves one
implementation per op into a :class:`~heteroserve.core.kernels.dispatch.DispatchTable` and
calls it directly on the hot path.

Unless an op says otherwise: inputs are contiguous device tensors on one device; activations
are bf16, fp16 or fp32 and outputs keep the input dtype; accumulation is at least fp32; an op
may overwrite an input only where its contract says "in place".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from heteroserve.core.quantization import nibbles

# -- op names ---------------------------------------------------------------------------------
ATTENTION = "attention"
MLA_ATTENTION = "mla_attention"  # a backend class (contract: core/kernels/mla.py)
KV_WRITE = "kv_write"  # not separately registered: part of the attention backend, listed for docs
RMS_NORM = "rms_norm"
FUSED_ADD_RMS_NORM = "fused_add_rms_norm"
NORM_ADD_NORM = "norm_add_norm"
SILU_AND_MUL = "silu_and_mul"
GELU_AND_MUL = "gelu_and_mul"
ROTARY = "rotary_embedding"
QK_NORM_ROTARY = "qk_norm_rotary"
MOE_TOPK_SOFTMAX = "moe_topk_softmax"
MOE_GROUPED_TOPK = "moe_grouped_topk"
FUSED_MOE = "fused_moe"
SAMPLING = "sampling"
TOKEN_BITMASK_APPLY = "token_bitmask_apply"


def linear_op(scheme: str) -> str:
    """Registry name of the linear method for quantization ``scheme``."""
    return f"linear.{scheme}"


FUNCTION_OPS: tuple[str, ...] = (
    RMS_NORM, FUSED_ADD_RMS_NORM, NORM_ADD_NORM, SILU_AND_MUL, GELU_AND_MUL, ROTARY,
    QK_NORM_ROTARY, MOE_TOPK_SOFTMAX, MOE_GROUPED_TOPK, FUSED_MOE, SAMPLING, TOKEN_BITMASK_APPLY,
)


# -- function-op contracts --------------------------------------------------------------------
class RMSNormOp(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x [T, H]``, ``weight [H]`` -> ``x / sqrt(mean(x^2) + eps) * weight``, ``[T, H]``,
        computed in fp32 and cast back to ``x.dtype``."""


class FusedAddRMSNormOp(Protocol):
    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``r = x + residual``; returns ``(rms_norm(r, weight, eps), r)``. In place: may
        overwrite ``x`` and ``residual``; callers use only the returned tensors."""


class NormAddNormOp(Protocol):
    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of a block's output, residual add, RMSNorm of the sum, in one op (Gemma's
        sandwich norms: a post-norm followed by the next pre-norm).

        ``x [T, H]`` and ``residual [T, H]`` of one dtype; ``weight [H]`` and
        ``next_weight [H]`` are effective weights (Gemma's ``1 + w`` folded in); one ``eps``
        for both norms. Result: exactly ``FusedAddRMSNormOp(RMSNormOp(x, weight, eps),
        residual, next_weight, eps)``, rounded at the same points: ``y = x / rms(x) *
        weight`` (fp32 math) rounded to the dtype, ``r = y + residual`` rounded to the
        dtype, ``out = r / rms(r) * next_weight`` (fp32 math) rounded to the dtype. Returns
        ``(out, r)``. In place: may overwrite ``x`` and ``residual``; callers use only the
        returned tensors. Raises ``ValueError`` on mismatched shapes or dtypes."""


class SiluAndMulOp(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, 2I]`` = ``[gate | up]`` -> ``silu(gate) * up``, ``[T, I]``."""


class GeluAndMulOp(Protocol):
    def __call__(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """``x [T, 2I]`` -> ``gelu(gate, approximate) * up`` (``approximate``: none|tanh)."""


class RotaryOp(Protocol):
    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding.

        ``positions`` int64 ``[T]``; ``q [T, Hq, D]``, ``k [T, Hk, D]``; ``cos_sin_cache``
        fp32 ``[max_position, R]`` holding ``[cos | sin]`` of the ``R/2`` frequencies
        (``R <= D``; only the first ``R`` dims of each head rotate, the rest pass through;
        any scaling such as Llama-3's is already folded into the cache). ``is_neox``: rotate
        halves ``(x[:R/2], x[R/2:R])``; otherwise GPT-J style interleaved pairs
        ``(x[0::2], x[1::2])`` within the first ``R`` dims. Returns ``(q, k)``; in place
        allowed.
        """


class QKNormRotaryOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head RMSNorm of q and k, then rotary embedding, in one op (Qwen3, Gemma 3).

        ``q [T, Hq, D]`` and ``k [T, Hk, D]`` of one dtype may be strided views (as split
        from a fused qkv projection output: last dim contiguous, rows and heads any stride);
        ``q_weight [D]`` and ``k_weight [D]`` are the effective norm weights (Gemma's
        ``1 + w`` already folded in); ``positions`` int64 ``[T]``; ``cos_sin_cache`` fp32
        ``[max_position, R]`` as for :class:`RotaryOp`.

        Result: exactly the composition of the two ops, ``RotaryOp(positions,
        RMSNormOp(q, q_weight, eps), RMSNormOp(k, k_weight, eps), cos_sin_cache, is_neox)``
        with the norm applied to each head's ``D`` values (fp32 math, rounded to the dtype)
        and the rotation to the normalised, rounded values. Returns ``(q, k)`` in the input
        dtype and shapes; in place allowed (an implementation may overwrite ``q`` and ``k``
        and nothing else of the tensors they view). Raises ``ValueError`` on inconsistent
        shapes or dtypes (positions are not range-checked, to avoid a host sync).
        """


class TopKSoftmaxOp(Protocol):
    def __call__(self, router_logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``router_logits [T, E]`` -> ``(weights fp32 [T, k], ids int32 [T, k])``: softmax in
        fp32, the ``k`` largest probabilities in descending order (ties: lower expert id
        first), renormalised to sum to 1 when ``renormalize``.

        Shared-expert slots (optional, :data:`MOE_SHARED_SLOTS_ATTR`): an implementation
        whose attribute ``appends_shared_experts`` is True also takes the keyword
        ``shared_experts=n`` and returns ``[T, k + n]``, as :func:`append_shared_slots`."""


class GroupedTopKOp(Protocol):
    def __call__(self, router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 num_expert_group: int, topk_group: int, scoring: str = "softmax",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-style routing. Scores are ``softmax`` or ``sigmoid`` of the logits (fp32).
        Experts split into ``num_expert_group`` equal groups; a group's score is its max
        score (with ``correction_bias``: the sum of its two best biased scores); the best
        ``topk_group`` groups stay; the top ``k`` experts are chosen among them by biased
        score but weighted by unbiased score; optional renormalisation, then multiply by
        ``routed_scaling_factor``. Returns ``(weights fp32 [T,k], ids int32 [T,k])``, order
        unspecified. Shared-expert slots: as :class:`TopKSoftmaxOp` (the slots are neither
        renormalised nor scaled)."""


#: name of the optional attribute (True) by which a ``moe_topk_softmax`` or
#: ``moe_grouped_topk`` implementation declares that it takes ``shared_experts=n`` and
#: appends the shared-expert slots itself (DeepSeek's always-on experts, stored as experts
#: ``E .. E + n - 1`` of the fused MoE), so a decode step needs no concatenation after it
MOE_SHARED_SLOTS_ATTR = "appends_shared_experts"


def append_shared_slots(weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                        shared_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The meaning of ``shared_experts=n`` on a top-k op: the routed choice ``(weights fp32
    [T, k], ids int32 [T, k])`` followed by ``n`` columns holding ids ``num_experts + j`` at
    weight exactly 1.0, ``(weights [T, k + n], ids [T, k + n])``. Raises ``ValueError`` for
    a negative ``n``."""
    if shared_experts < 0:
        raise ValueError(f"shared_experts must be >= 0, got {shared_experts}")
    if shared_experts == 0:  # every model without shared experts: nothing to copy
        return weights, ids
    t = ids.shape[0]
    slot_ids = torch.arange(num_experts, num_experts + shared_experts, dtype=torch.int32,
                            device=ids.device).expand(t, shared_experts)
    return (torch.cat([weights, weights.new_ones(t, shared_experts)], dim=1),
            torch.cat([ids, slot_ids], dim=1))


#: expert weight schemes the ``fused_moe`` contract defines (see :class:`MoEWeightQuant`)
MOE_WEIGHT_SCHEMES: tuple[str, ...] = ("fp8_block", "w4a16")


@dataclass(frozen=True)
class MoEWeightQuant:
    """Quantized expert weights passed to ``fused_moe`` (weight-only: ``x`` stays in the
    model dtype; the products are taken in at least fp32 with ``x`` unquantized).

    ``scheme`` ``fp8_block`` (DeepSeek-V3, Qwen3-FP8 experts): ``w13`` float8_e4m3fn
    ``[E, 2I, H]`` with ``w13_scale`` fp32 ``[E, ceil(2I/128), ceil(H/128)]``, ``w2``
    float8_e4m3fn ``[E, H, I]`` with ``w2_scale`` fp32 ``[E, ceil(H/128), ceil(I/128)]``;
    ``I`` is a multiple of 128 (the gate and up halves of ``w13`` and their scale rows start
    on block boundaries). Meaning: ``W[e, n, k] = w[e, n, k] * scale[e, n // 128, k // 128]``.

    ``scheme`` ``w4a16`` (AWQ, GPTQ without act-order and compressed-tensors W4A16 experts,
    brought to one layout at load): ``w13`` int32 ``[E, 2I, H // 8]`` and ``w2`` int32
    ``[E, H, I // 8]``, each word holding eight consecutive input features of one output
    row, feature ``8 * w + j`` in bits ``4j .. 4j + 3`` (unsigned 0..15); ``w13_scale`` /
    ``w2_scale`` fp32 and ``w13_zero`` / ``w2_zero`` int8 (0..16: GPTQ v1 stores
    ``zero - 1`` in a nibble) of shapes ``[E, 2I, H // G]``
    / ``[E, H, I // G]`` with ``G = group_size``, a multiple of 8 that divides ``H`` and ``I``.
    Meaning: ``W[e, n, k] = (q[e, n, k] - zero[e, n, k // G]) * scale[e, n, k // G]``
    (:func:`dequantize_w4_experts`)."""

    scheme: str
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    w13_zero: torch.Tensor | None = None
    w2_zero: torch.Tensor | None = None
    group_size: int = 0


def moe_expert_dims(w13: torch.Tensor, w2: torch.Tensor, quant: MoEWeightQuant | None
                    ) -> tuple[int, int, int]:
    """``(E, I, H)`` of the experts ``fused_moe`` is passed: ``w13``'s shape, with the
    packed last dim of ``w4a16`` experts counted in features. Raises ``ValueError`` when
    ``w13`` and ``w2`` disagree (or ``w13`` has an odd row count)."""
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("fused_moe: w13 and w2 must be 3-D")
    per_word = 8 if quant is not None and quant.scheme == "w4a16" else 1
    e, two_i, h = w13.shape[0], w13.shape[1], w13.shape[2] * per_word
    if two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2 // per_word):
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                         f"disagree{' (w4a16: last dims packed 8 a word)' if per_word > 1 else ''}")
    return e, two_i // 2, h


def check_w4_experts(quant: MoEWeightQuant, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``quant`` (scheme ``w4a16``) fits int32 ``w13`` / ``w2``
    as :class:`MoEWeightQuant` describes: scales fp32 and zeros int8 of the group grid,
    ``G`` a multiple of 8 dividing ``H`` and ``I``."""
    e, inter, h = moe_expert_dims(w13, w2, quant)
    g = quant.group_size
    ok = (w13.dtype == torch.int32 and w2.dtype == torch.int32 and g > 0 and g % 8 == 0
          and h % g == 0 and inter % g == 0 and quant.w13_zero is not None
          and quant.w2_zero is not None)
    if ok:
        want13, want2 = (e, 2 * inter, h // g), (e, h, inter // g)
        ok = (tuple(quant.w13_scale.shape) == want13 and tuple(quant.w2_scale.shape) == want2
              and tuple(quant.w13_zero.shape) == want13 and tuple(quant.w2_zero.shape) == want2
              and quant.w13_scale.dtype == torch.float32
              and quant.w2_scale.dtype == torch.float32
              and quant.w13_zero.dtype == torch.int8 and quant.w2_zero.dtype == torch.int8)
    if not ok:
        shapes = lambda t: None if t is None else (tuple(t.shape), str(t.dtype))  # noqa: E731
        raise ValueError(
            f"fused_moe: w4a16 experts w13 {shapes(w13)} / w2 {shapes(w2)} with group "
            f"{g}, scales {shapes(quant.w13_scale)} / {shapes(quant.w2_scale)}, zeros "
            f"{shapes(quant.w13_zero)} / {shapes(quant.w2_zero)} do not fit the contract "
            "(int32 weights packed 8 a word, fp32 scales and int8 zeros [E, N, K // G], "
            "G a multiple of 8 dividing H and I)")


def dequantize_w4_experts(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """fp32 ``W [..., N, K]`` of ``w4a16`` expert words ``q [..., N, K // 8]`` (one expert or
    all) with their ``scale`` / ``zero [..., N, K // G]``: the reference meaning of the
    scheme (torch ops; a platform may use it for the experts a call touches)."""
    nib = nibbles.unpack(q, -1).to(torch.float32)
    expand = lambda t: t.to(torch.float32).repeat_interleave(group_size, dim=-1)  # noqa: E731
    return (nib - expand(zero)) * expand(scale)


class FusedMoEOp(Protocol):
    def __call__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 quant: MoEWeightQuant | None = None) -> torch.Tensor:
        """Mixture of experts with SiLU-and-mul experts.

        ``x [T, H]``; ``w13 [E, 2I, H]`` (rows ``:I`` gate, ``I:`` up); ``w2 [E, H, I]``;
        ``topk_weights`` fp32 ``[T, k]``; ``topk_ids`` int ``[T, k]`` in ``[0, E)``; either
        may be a strided view (rows any stride: DeepSeek's shared-expert slots are appended
        as halves of one tensor).
        ``out[t] = sum_j topk_weights[t, j] * w2[e] @ silu_and_mul(w13[e] @ x[t])`` with
        ``e = topk_ids[t, j]``. Returns ``[T, H]`` in ``x.dtype``.

        Without ``quant`` the weights are in ``x.dtype``. With ``quant`` (a
        :class:`MoEWeightQuant`) they are stored in ``quant.scheme`` and mean its dequantized
        values. Only an implementation that lists the scheme in its
        ``moe_weight_schemes`` attribute (:data:`MOE_WEIGHT_SCHEMES_ATTR`; default: none) is
        ever passed ``quant``, always by keyword; the MoE layer dequantizes the experts for
        any other. Raises ``ValueError`` for a scheme it does not run or inconsistent
        shapes.

        Weight processing (optional): an implementation that wants the experts in its own
        layout (shuffled, interleaved, re-tiled) has an attribute
        ``process_weights_after_loading(w13, w2) -> (w13, w2)``, see
        :data:`MOE_PROCESS_WEIGHTS_ATTR`; the MoE layer calls it once after loading and then
        passes only the returned tensors to this op (quantized experts too: then it gets
        and must return the stored tensors, whose scales it may not move)."""


#: name of the optional weight-processing attribute of a ``fused_moe`` implementation
MOE_PROCESS_WEIGHTS_ATTR = "process_weights_after_loading"

#: name of the optional attribute of a ``fused_moe`` implementation that says, for the
#: start-up block, how it will run a layer's experts: ``describe_experts(w13, w2) -> str``
#: (the tensors the op will be passed), one line such as which tile table applies
MOE_DESCRIBE_ATTR = "describe_experts"

#: name of the optional attribute (a tuple of scheme names from :data:`MOE_WEIGHT_SCHEMES`)
#: by which a ``fused_moe`` implementation declares the quantized expert weights it runs
MOE_WEIGHT_SCHEMES_ATTR = "moe_weight_schemes"

#: name of the optional boolean attribute by which a function op's implementation (e.g.
#: ``fused_moe``) declares that it makes no host synchronisation, so that a device graph may
#: capture it (attention backends say the same with ``AttentionBackend.graph_safe``)
GRAPH_SAFE_ATTR = "graph_safe"


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, as device tensors of length ``B``.

    ``temperatures`` fp32 (0 means greedy for that row); ``top_ks`` int32 (<= 0 means off);
    ``top_ps`` fp32 in (0, 1] (1 means off); ``min_ps`` fp32 in [0, 1) (0 means off);
    ``seeds`` int64 and ``steps`` int64 (tokens generated so far) key each row's randomness.
    ``all_greedy`` is a host flag letting implementations skip the random path.
    """

    temperatures: torch.Tensor
    top_ks: torch.Tensor
    top_ps: torch.Tensor
    min_ps: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    all_greedy: bool = False


class SamplingOp(Protocol):
    def __call__(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
        """``logits`` fp32 ``[B, V]`` (penalties and grammar masks already applied) ->
        token ids int64 ``[B]``.

        Greedy rows return the argmax (lowest id on ties). Other rows divide by temperature,
        then keep tokens passing every active filter (top-k: the k most likely; top-p: the
        smallest prefix of the sorted distribution whose mass reaches p, always at least one
        token; min-p: probability >= min_p * max probability) and draw from the renormalised
        rest. A token whose logit is -inf is never returned. The draw is a deterministic
        function of (row logits, row parameters, seed, step): the same request gives the same
        tokens whatever else is in the batch.
        """


class TokenBitmaskApplyOp(Protocol):
    def __call__(self, logits: torch.Tensor, bitmask: torch.Tensor,
                 indices: torch.Tensor | None = None) -> None:
        """In place: ``logits [B, V]`` float, ``bitmask`` int32 ``[M, W]`` (xgrammar's layout:
        token ``t`` is allowed iff bit ``t % 32`` of word ``t // 32`` is set). Row ``i`` of the
        bitmask masks logits row ``indices[i]`` (all rows in order when ``indices`` is None,
        then ``M == B``). Disallowed tokens, and every column ``>= 32 * W``, become -inf;
        allowed ones are unchanged. Exact: no tolerance."""
