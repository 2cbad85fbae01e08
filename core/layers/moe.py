"""Mixture-of-experts block: router, top-k routing and fused experts via the dispatch table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heteroserve.core.kernels.ops import (
    FUSED_MOE, MOE_DESCRIBE_ATTR, MOE_PROCESS_WEIGHTS_ATTR, MOE_WEIGHT_SCHEMES,
    MOE_WEIGHT_SCHEMES_ATTR, MoEWeightQuant,
)
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.kernels.linear import (
    FP8_BLOCK, LINEAR_SCHEMES, LinearShape, ParamSpec, checkpoint_specs,
)
from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.core.quantization.base import UNQUANTIZED, LayerQuant, QuantizationError
from heteroserve.core.quantization.dequantize import dequantize
from heteroserve.core.quantization.w4_experts import W4_EXPERT_SCHEMES, W4Rows, w4_rows

_HF_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class ExpertStorage:
    """How a MoE block holds its experts. ``scheme``: the checkpoint's linear scheme for them
    (``unquantized``: float experts); ``kept``: they stay quantized in memory, as the fused
    MoE contract's expert scheme ``moe_scheme`` (``fp8_block`` as stored; ``w4a16`` for the
    4-bit schemes, repacked at load), and go to the fused MoE op with their scales;
    otherwise they are dequantized to the model dtype at load and ``reason`` says why.
    ``group_size``: the 4-bit schemes' group."""

    scheme: str
    kept: bool
    reason: str = ""
    moe_scheme: str = ""
    group_size: int = 0

    def describe(self, dtype: torch.dtype) -> str:
        """One line for the start-up block."""
        if self.kept and self.moe_scheme == "w4a16":
            return (f"{self.scheme} kept 4-bit (weight-only through fused_moe as w4a16 "
                    f"experts, groups of {self.group_size})")
        if self.kept:
            return f"{self.scheme} kept (weight-only through fused_moe, 128x128 block scales)"
        return f"{self.scheme} dequantized to {str(dtype).removeprefix('torch.')}: {self.reason}"


def moe_expert_scheme(scheme: str) -> str:
    """The fused MoE contract's expert scheme that experts stored as linear scheme
    ``scheme`` would be held as ("" when there is none)."""
    if scheme in W4_EXPERT_SCHEMES:
        return "w4a16"
    return scheme if scheme in MOE_WEIGHT_SCHEMES else ""


def expert_storages(model: nn.Module) -> list[ExpertStorage]:
    """The distinct :class:`ExpertStorage` of ``model``'s quantized MoE blocks, in order."""
    seen: dict[ExpertStorage, None] = {}
    for module in model.modules():
        if isinstance(module, FusedMoE) and module.storage.scheme != "unquantized":
            seen.setdefault(module.storage)
    return list(seen)


def expert_storage(ctx: LayerContext, quant: LayerQuant, inter: int,
                   hidden: int | None = None) -> ExpertStorage:
    """How experts stored as ``quant`` in the checkpoint are held, ``inter`` being each
    rank's share of the intermediate size and ``hidden`` the hidden size. Quantized experts
    are kept when the resolved ``fused_moe`` declares their contract scheme
    (``moe_weight_schemes``, :func:`moe_expert_scheme`) and their layout allows it; else
    dequantized. ``fp8_block``: the platform's fp8 flavour is the checkpoint's e4m3fn and
    ``inter`` a multiple of 128 (block scales of the gate and up halves and of the
    tensor-parallel slices then stay whole). AWQ / GPTQ 4-bit: no act-order, and the group
    a multiple of 8 that divides ``hidden`` and ``inter``."""
    scheme = quant.scheme
    if scheme == "unquantized":
        return ExpertStorage(scheme, True)
    res = ctx.dispatch.resolutions.get(FUSED_MOE)
    impl = f"fused_moe={res.chosen.name}" if res is not None else "fused_moe"
    moe_scheme = moe_expert_scheme(scheme)
    if not moe_scheme:
        reason = f"the fused_moe contract has no {scheme} experts"
    elif moe_scheme not in getattr(ctx.dispatch.fused_moe, MOE_WEIGHT_SCHEMES_ATTR, ()):
        reason = f"{impl} does not run {moe_scheme} experts"
    elif moe_scheme == "w4a16":
        group = quant.group_size
        if quant.has_g_idx:
            reason = "act-order (desc_act) experts permute their input features"
        elif group <= 0 or group % 8 or (hidden is not None and hidden % group) or \
                inter % group:
            reason = (f"group size {group} is not a multiple of 8 dividing the hidden size "
                      f"{hidden} and the per-rank moe intermediate size {inter} "
                      f"(tp {ctx.tp_size})")
        else:
            return ExpertStorage(scheme, True, moe_scheme=moe_scheme, group_size=group)
    elif ctx.fp8_dtype != torch.float8_e4m3fn:
        reason = (f"the platform's fp8 flavour is {str(ctx.fp8_dtype).removeprefix('torch.')}"
                  if ctx.fp8_dtype is not None else "the platform declares no fp8 flavour")
        reason += " (the checkpoint's experts are float8_e4m3fn)"
    elif inter % FP8_BLOCK:
        reason = (f"the per-rank moe intermediate size {inter} (tp {ctx.tp_size}) is "
                  f"not a multiple of {FP8_BLOCK}, which splits scale blocks")
    else:
        return ExpertStorage(scheme, True, moe_scheme=moe_scheme)
    return ExpertStorage(scheme, False, reason)


class FusedMoE(nn.Module):
    """``E`` SiLU-and-mul experts stored as ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``; with tensor parallelism each rank holds ``I / tp`` of every expert and
    the output is all-reduced. Checkpoint tensors load per expert: ``load("w1"|"w3"|"w2",
    tensor, expert)`` (Mixtral names; Qwen's gate/up/down map onto them).

    Quantized experts (per-expert fp8, int8 or 4-bit tensors of the checkpoint's format)
    load through :meth:`load_quantized`. Where :attr:`storage` keeps them (see
    :func:`expert_storage`) they go to the fused MoE op as a
    :class:`~heteroserve.core.kernels.ops.MoEWeightQuant`: ``fp8_block`` experts stay fp8
    (``w13``/``w2`` float8_e4m3fn plus ``w13_scale``/``w2_scale`` fp32 block scales); AWQ,
    GPTQ and compressed-tensors 4-bit experts become ``w4a16`` experts (``w13``/``w2`` int32
    words, ``w13_scale``/``w2_scale`` fp32 and ``w13_zero``/``w2_zero`` int8 per group);
    every other case is dequantized to the model dtype at load, and the fused MoE op runs
    on dense weights. A linear scheme a plugin
    added works too: its tensors are those its resolved ``linear.<scheme>`` method's
    ``create_weights`` declares, and its ``LinearSchemeSpec.dequantize``
    (``ctx.linear_schemes``) makes the dense weight; a plugin scheme without one is refused
    with a :class:`QuantizationError` naming the layer and the scheme."""

    def __init__(self, ctx: LayerContext, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, renormalize: bool, prefix: str = "") -> None:
        super().__init__()
        self.prefix, self.hidden = prefix, hidden_size
        self.expert_quant = self.checkpoint_expert_quant(ctx, prefix)
        self._pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._specs: dict[tuple[int, int], dict[str, ParamSpec]] = {}
        if intermediate_size % ctx.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size}")
        self.ctx, self.top_k, self.renormalize = ctx, top_k, renormalize
        self.inter = intermediate_size // ctx.tp_size
        self.gate = ReplicatedLinear(ctx, hidden_size, num_experts, bias=False,
                                     scheme="unquantized", prefix=f"{prefix}.gate")
        self.storage = expert_storage(ctx, self.expert_quant, self.inter, hidden_size)
        self.weight_quant: MoEWeightQuant | None = None
        make = lambda *shape, dtype: nn.Parameter(  # noqa: E731
            torch.empty(*shape, dtype=dtype, device=ctx.device), requires_grad=False)
        e, i, h = num_experts, self.inter, hidden_size
        moe_scheme = self.storage.moe_scheme if self.storage.kept else ""
        if moe_scheme == "w4a16":  # eight 4-bit features a word, scale and zero per group
            g = self.storage.group_size
            self.w13 = make(e, 2 * i, h // 8, dtype=torch.int32)
            self.w2 = make(e, h, i // 8, dtype=torch.int32)
            self.w13_scale = make(e, 2 * i, h // g, dtype=torch.float32)
            self.w2_scale = make(e, h, i // g, dtype=torch.float32)
            self.w13_zero = make(e, 2 * i, h // g, dtype=torch.int8)
            self.w2_zero = make(e, h, i // g, dtype=torch.int8)
            self.weight_quant = MoEWeightQuant(moe_scheme, self.w13_scale, self.w2_scale,
                                               self.w13_zero, self.w2_zero, g)
        elif moe_scheme == "fp8_block":  # one fp32 scale per 128x128 block of a projection
            self.w13 = make(e, 2 * i, h, dtype=torch.float8_e4m3fn)
            self.w2 = make(e, h, i, dtype=torch.float8_e4m3fn)
            h_blocks, i_blocks = -(-h // FP8_BLOCK), i // FP8_BLOCK
            self.w13_scale = make(e, 2 * i_blocks, h_blocks, dtype=torch.float32)
            self.w2_scale = make(e, h_blocks, i_blocks, dtype=torch.float32)
            self.weight_quant = MoEWeightQuant(moe_scheme, self.w13_scale, self.w2_scale)
        else:
            self.w13 = make(e, 2 * i, h, dtype=ctx.dtype)
            self.w2 = make(e, h, i, dtype=ctx.dtype)

    @staticmethod
    def checkpoint_expert_quant(ctx: LayerContext, prefix: str) -> LayerQuant:
        """How the checkpoint stores the experts (asked for expert 0's gate projection, in
        both spellings); quantized experts are dequantized to the model dtype at load.
        Raises :class:`QuantizationError` for online fp8 and for a plugin scheme with no
        definition in ``ctx.linear_schemes`` (nothing to dequantize it with)."""
        if ctx.quant is None:
            return UNQUANTIZED
        for name in ("w1", "gate_proj"):
            quant = ctx.quant.layer_quant(f"{prefix}.experts.0.{name}")
            if quant.scheme != "unquantized":
                if quant.online:
                    raise QuantizationError(f"{prefix}.experts: --quantization fp8 does not "
                                            "quantize MoE experts")
                if quant.scheme not in LINEAR_SCHEMES and quant.scheme not in ctx.linear_schemes:
                    raise QuantizationError(
                        f"{prefix}.experts: linear scheme {quant.scheme!r} has no dequantize "
                        "definition (no plugin returns a LinearSchemeSpec for it from "
                        "heteroserve_linear_schemes), which MoE experts need")
                return quant
        return UNQUANTIZED

    def _wanted(self, n: int, k: int) -> dict[str, ParamSpec]:
        """The tensors of one ``[n, k]`` expert projection in the experts' scheme: the
        built-in layout, or what the resolved method of a plugin's scheme declares."""
        if (n, k) not in self._specs:
            q = self.expert_quant
            shape = LinearShape(k, n, self.ctx.dtype, q.group_size, q.has_g_idx)
            if q.scheme in LINEAR_SCHEMES:
                self._specs[(n, k)] = checkpoint_specs(q.scheme, shape)
            else:
                method = self.ctx.dispatch.linear.get(q.scheme)
                if method is None:
                    raise QuantizationError(f"{self.prefix}.experts: no linear.{q.scheme} "
                                            "kernel was resolved")
                self._specs[(n, k)] = method().create_weights(shape)
        return self._specs[(n, k)]

    def _dense(self, parts: dict[str, torch.Tensor], n: int, k: int, where: str
               ) -> torch.Tensor:
        """Float ``W [n, k]`` of one expert projection (``where`` names it in errors)."""
        q = self.expert_quant
        if q.scheme in LINEAR_SCHEMES:
            return dequantize(q.scheme, parts, q.group_size)
        spec = self.ctx.linear_schemes[q.scheme]
        who = f"{where}: linear scheme {q.scheme!r} (plugin {spec.provider or '?'}) dequantize"
        try:
            weight = spec.dequantize(dict(parts))
        except Exception as exc:
            raise QuantizationError(f"{who} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n, k):
            got = list(weight.shape) if isinstance(weight, torch.Tensor) else \
                type(weight).__name__
            raise QuantizationError(f"{who} returned {got}, expected a [{n}, {k}] tensor")
        return weight

    def load_quantized(self, name: str, suffix: str, tensor: torch.Tensor, expert: int) -> None:
        """Collect expert ``expert``'s projection ``name`` tensors (``suffix``: ``weight``,
        ``weight_scale_inv``, ``qweight``, ...); once all the scheme's tensors are there,
        place them: as they are where :attr:`storage` keeps the scheme, else dequantized as
        :meth:`load` places a float weight. Raises ``ValueError`` naming a tensor that does
        not fit, when that tensor arrives (:class:`QuantizationError`, one of them, when a
        plugin scheme's ``dequantize`` raises or returns anything but a ``[N, K]`` tensor)."""
        q = self.expert_quant
        n, k = (self.hidden, self.inter * self.ctx.tp_size) if name == "w2" else \
            (self.inter * self.ctx.tp_size, self.hidden)
        wanted = self._wanted(n, k)
        parts = self._pending.setdefault((expert, name), {})
        for pname, part in q.convert(suffix, tensor, (n, k)):
            spec = wanted.get(pname)
            if spec is not None and tuple(part.shape) != spec.shape:
                raise ValueError(f"{pname} has shape {list(part.shape)}, expected "
                                 f"{list(spec.shape)}")
            parts[pname] = part
        if not set(wanted) <= set(parts):
            return
        del self._pending[(expert, name)]
        if self.weight_quant is not None and self.weight_quant.scheme == "w4a16":
            self._place_w4(name, w4_rows(q.scheme, parts), expert)
            return
        if self.weight_quant is not None:
            self._place_fp8_block(name, parts["weight"], parts["weight_scale_inv"], expert)
            return
        weight = self._dense(parts, n, k, f"{self.prefix}.experts.{expert}.{name} "
                                          f"({_HF_NAMES.get(name, name)})")
        self.load(name, weight.to(self.ctx.dtype), expert)

    def _place_fp8_block(self, name: str, weight: torch.Tensor, scale: torch.Tensor,
                         expert: int) -> None:
        """This rank's rows (``w1``/``w3``) or columns (``w2``) of a full-size fp8 weight and
        the matching block scales (whole blocks: ``inter`` is a multiple of 128)."""
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"weight is {weight.dtype}; fp8_block experts are float8_e4m3fn")
        r, i = self.ctx.tp_rank, self.inter
        b = i // FP8_BLOCK
        if name == "w2":
            self.w2.data[expert].copy_(weight[:, r * i:(r + 1) * i])
            self.w2_scale.data[expert].copy_(scale[:, r * b:(r + 1) * b])
            return
        rows, blocks = (slice(0, i), slice(0, b)) if name == "w1" else \
            (slice(i, 2 * i), slice(b, 2 * b))
        if name not in ("w1", "w3"):
            raise ValueError(f"unknown expert weight {name!r}")
        self.w13.data[expert, rows].copy_(weight[r * i:(r + 1) * i])
        self.w13_scale.data[expert, blocks].copy_(scale[r * b:(r + 1) * b])

    def _place_w4(self, name: str, rows: W4Rows, expert: int) -> None:
        """This rank's rows (``w1``/``w3``) or input features (``w2``, whole groups) of a
        full-size 4-bit projection, packed into the ``w4a16`` words."""
        r, i = self.ctx.tp_rank, self.inter
        if name == "w2":
            rows = rows.columns(r * i, i, self.storage.group_size)
            dest = (self.w2, self.w2_scale, self.w2_zero, slice(None))
        elif name in ("w1", "w3"):
            rows = rows.rows(slice(r * i, (r + 1) * i))
            dest = (self.w13, self.w13_scale, self.w13_zero,
                    slice(0, i) if name == "w1" else slice(i, 2 * i))
        else:
            raise ValueError(f"unknown expert weight {name!r}")
        words, scales, zeros, out_rows = dest
        words.data[expert, out_rows].copy_(rows.words())
        scales.data[expert, out_rows].copy_(rows.scale)
        zeros.data[expert, out_rows].copy_(rows.zero)

    def check_loaded(self) -> None:
        """Raise :class:`QuantizationError` naming an expert projection whose quantized
        tensors were not all in the checkpoint."""
        for (expert, name), parts in self._pending.items():
            raise QuantizationError(
                f"checkpoint tensors for {self.prefix}.experts.{expert}.{name} "
                f"({_HF_NAMES.get(name, name)}) are incomplete: got {', '.join(parts)} "
                f"({self.expert_quant.label})")

    def load(self, name: str, tensor: torch.Tensor, expert: int) -> None:
        r, i = self.ctx.tp_rank, self.inter
        if name == "w1":
            self.w13.data[expert, :i].copy_(tensor[r * i:(r + 1) * i])
        elif name == "w3":
            self.w13.data[expert, i:].copy_(tensor[r * i:(r + 1) * i])
        elif name == "w2":
            self.w2.data[expert].copy_(tensor[:, r * i:(r + 1) * i])
        else:
            raise ValueError(f"unknown expert weight {name!r}")

    def process_weights_after_loading(self) -> None:
        """Let the ``fused_moe`` implementation convert the loaded experts to its own layout
        once (its optional ``process_weights_after_loading(w13, w2)``, see ``FusedMoEOp``;
        kept quantized experts go to it as stored, their scales stay)."""
        process = getattr(self.ctx.dispatch.fused_moe, MOE_PROCESS_WEIGHTS_ATTR, None)
        if process is None:
            return
        w13, w2 = process(self.w13.data, self.w2.data)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def kernel_note(self) -> str | None:
        """What the ``fused_moe`` implementation says of running these experts (its optional
        ``describe_experts``, see :data:`MOE_DESCRIBE_ATTR`), for the start-up block; None
        when it says nothing."""
        describe = getattr(self.ctx.dispatch.fused_moe, MOE_DESCRIBE_ATTR, None)
        return None if describe is None else f"fused_moe: {describe(self.w13, self.w2)}"

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
        """The routed experts' weighted sum for ``x [T, H]`` (this rank's part, before the
        all-reduce), with the quantized weights' scales where the experts are kept."""
        fused_moe = self.ctx.dispatch.fused_moe
        if self.weight_quant is None:
            return fused_moe(x, self.w13, self.w2, weights, ids)
        return fused_moe(x, self.w13, self.w2, weights, ids, quant=self.weight_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ctx.dispatch
        weights, ids = d.moe_topk_softmax(self.gate(x), self.top_k, self.renormalize)
        return self.ctx.all_reduce(self.experts(x, weights, ids))
