"""Mixture-of-experts block: router, top-k routing and fused experts via the dispatch table."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.ops import MOE_PROCESS_WEIGHTS_ATTR
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.kernels.linear import LINEAR_SCHEMES, LinearShape, ParamSpec, checkpoint_specs
from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.core.quantization.base import UNQUANTIZED, LayerQuant, QuantizationError
from heteroserve.core.quantization.dequantize import dequantize

_HF_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class FusedMoE(nn.Module):
    """``E`` SiLU-and-mul experts stored as ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``; with tensor parallelism each rank holds ``I / tp`` of every expert and
    the output is all-reduced. Checkpoint tensors load per expert: ``load("w1"|"w3"|"w2",
    tensor, expert)`` (Mixtral names; Qwen's gate/up/down map onto them).

    Quantized experts (per-expert fp8, int8 or 4-bit tensors of the checkpoint's format)
    load through :meth:`load_quantized` and are dequantized to the model dtype: the fused
    MoE op runs on dense weights (no memory saving for the experts). A linear scheme a plugin
    added works too: its tensors are those its resolved ``linear.<scheme>`` method's
    ``create_weights`` declares, and its ``LinearSchemeSpec.dequantize``
    (``ctx.linear_schemes``) makes the dense weight; a plugin scheme without one is refused
    with a :class:`QuantizationError` naming the layer and the scheme."""

    def __init__(self, ctx: LayerContext, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, renormalize: bool, prefix: str = "") -> None:
        super().__init__()
        self.prefix, self.hidden = prefix, hidden_size
        self.expert_quant = self._expert_quant(ctx, prefix)
        self._pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._specs: dict[tuple[int, int], dict[str, ParamSpec]] = {}
        if intermediate_size % ctx.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size}")
        self.ctx, self.top_k, self.renormalize = ctx, top_k, renormalize
        self.inter = intermediate_size // ctx.tp_size
        self.gate = ReplicatedLinear(ctx, hidden_size, num_experts, bias=False,
                                     scheme="unquantized", prefix=f"{prefix}.gate")
        make = lambda *shape: nn.Parameter(  # noqa: E731
            torch.empty(*shape, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.w13 = make(num_experts, 2 * self.inter, hidden_size)
        self.w2 = make(num_experts, hidden_size, self.inter)

    @staticmethod
    def _expert_quant(ctx: LayerContext, prefix: str) -> LayerQuant:
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
        dequantize and place them as :meth:`load` does. Raises ``ValueError`` naming a
        tensor that does not fit (:class:`QuantizationError`, one of them, when a plugin
        scheme's ``dequantize`` raises or returns anything but a ``[N, K]`` tensor)."""
        q = self.expert_quant
        n, k = (self.hidden, self.inter * self.ctx.tp_size) if name == "w2" else \
            (self.inter * self.ctx.tp_size, self.hidden)
        parts = self._pending.setdefault((expert, name), {})
        for pname, part in q.convert(suffix, tensor, (n, k)):
            parts[pname] = part
        wanted = self._wanted(n, k)
        if set(wanted) <= set(parts):
            for pname, spec in wanted.items():
                if tuple(parts[pname].shape) != spec.shape:
                    raise ValueError(f"{pname} has shape {list(parts[pname].shape)}, expected "
                                     f"{list(spec.shape)}")
            weight = self._dense(parts, n, k, f"{self.prefix}.experts.{expert}.{name} "
                                              f"({_HF_NAMES.get(name, name)})")
            del self._pending[(expert, name)]
            self.load(name, weight.to(self.ctx.dtype), expert)

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
        once (its optional ``process_weights_after_loading(w13, w2)``, see ``FusedMoEOp``)."""
        process = getattr(self.ctx.dispatch.fused_moe, MOE_PROCESS_WEIGHTS_ATTR, None)
        if process is None:
            return
        w13, w2 = process(self.w13.data, self.w2.data)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ctx.dispatch
        weights, ids = d.moe_topk_softmax(self.gate(x), self.top_k, self.renormalize)
        return self.ctx.all_reduce(d.fused_moe(x, self.w13, self.w2, weights, ids))
