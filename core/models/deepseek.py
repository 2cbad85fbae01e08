"""DeepSeek-V2 / V2-Lite / V3 / R1: multi-head latent attention and a routed MoE with
shared experts.

- Attention is MLA (:mod:`heteroserve.core.layers.mla`) over a latent KV cache; ``q_lora_rank``
  may be absent (V2-Lite). RoPE covers only ``qk_rope_head_dim`` dims, as interleaved pairs
  (V3 with ``rope_interleave: false``: halves); YaRN scaling multiplies the softmax scale by
  ``mscale(factor, mscale_all_dim) ** 2``.
- The first ``first_k_dense_replace`` layers have a dense MLP; the rest route each token to
  ``num_experts_per_tok`` of ``n_routed_experts`` experts through the ``moe_grouped_topk`` op
  (V2: softmax scores, ``greedy`` or ``group_limited_greedy``; V3: sigmoid scores with
  ``e_score_correction_bias``, ``noaux_tc``), weights times ``routed_scaling_factor``, plus
  ``n_shared_experts`` always-on experts (one MLP of ``n_shared * moe_intermediate_size``).
  Those run as ``n_shared`` extra experts of the fused MoE (their ids appended to every
  token's top-k with weight 1.0: one ``fused_moe`` call, no separate MLP); a separate MLP
  where that would not be exact or is disabled (:func:`shared_experts_path`).
- ``q_proj`` (tensor parallelism off) or ``q_a_proj`` and ``kv_a_proj_with_mqa`` read the
  same input and run as one merged projection where the checkpoint allows
  (:class:`~heteroserve.core.layers.mla.MultiHeadLatentAttention`).
- The start-up block's ``model path`` lines say which paths were taken and why not.
- Multi-token-prediction layers of V3 checkpoints (index >= ``num_hidden_layers``) are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.core.kernels.mla import MLABackend, MLAConfig
from heteroserve.core.kernels.ops import MOE_SHARED_SLOTS_ATTR
from heteroserve.core.layers.context import ForwardContext, LayerContext
from heteroserve.core.layers.embedding import VocabParallelEmbedding
from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.core.layers.mla import MLADims, MultiHeadLatentAttention
from heteroserve.core.layers.moe import ExpertStorage, FusedMoE, expert_storage
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.layers.rotary import RotaryEmbedding
from heteroserve.core.models.config import ModelConfig, ModelLoadError
from heteroserve.core.models.decoder import MLP, CausalLM, DecoderSpec
from heteroserve.core.quantization.base import UNQUANTIZED, LayerQuant

_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_QKV_A = re.compile(
    r"^(model\.layers\.\d+\.self_attn)\.(q_proj|q_a_proj|kv_a_proj_with_mqa)\.(\w+)$")
_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp)\.shared_experts\.(\w+)\.(\w+)$")


@dataclass(frozen=True)
class RoutingOptions:
    """How the router picks experts (see ``GroupedTopKOp``); ``greedy`` is one group."""

    num_experts: int
    top_k: int
    num_groups: int
    topk_group: int
    scoring: str
    renormalize: bool
    routed_scaling_factor: float
    correction_bias: bool


@dataclass(frozen=True)
class DeepseekOptions:
    """DeepSeek facts read from ``config.json``."""

    mla: MLADims
    routing: RoutingOptions
    moe_intermediate_size: int
    num_shared_experts: int
    first_k_dense_replace: int
    softmax_scale: float

    @classmethod
    def from_config(cls, cfg: ModelConfig, v3: bool) -> DeepseekOptions:
        raw = cfg.raw

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ModelLoadError(f"{cfg.path}/config.json: {cfg.architecture} needs {key!r}")
            return raw[key]

        mla = MLADims(
            hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
            q_lora_rank=raw.get("q_lora_rank"), kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"), qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"), attention_bias=bool(raw.get("attention_bias")),
            rope_is_neox=v3 and raw.get("rope_interleave") is False)
        method = raw.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        if method not in _TOPK_METHODS:
            raise ModelLoadError(f"{cfg.path}: topk_method {method!r} is not supported "
                                 f"(supported: {', '.join(_TOPK_METHODS)})")
        grouped = method != "greedy"
        scoring = raw.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        routing = RoutingOptions(
            num_experts=need("n_routed_experts"), top_k=need("num_experts_per_tok"),
            num_groups=int(raw.get("n_group") or 1) if grouped else 1,
            topk_group=int(raw.get("topk_group") or 1) if grouped else 1,
            scoring=scoring, renormalize=bool(raw.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
            correction_bias=method == "noaux_tc")
        return cls(mla=mla, routing=routing,
                   moe_intermediate_size=need("moe_intermediate_size"),
                   num_shared_experts=int(raw.get("n_shared_experts") or 0),
                   first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
                   softmax_scale=_softmax_scale(mla.qk_head_dim, cfg.rope_scaling))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _softmax_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN
    (DeepSeek scales the whole score, not only the rotary dims)."""
    scale = qk_head_dim ** -0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        m = _yarn_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


_SHARED_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass(frozen=True)
class SharedExpertsPath:
    """Where a DeepSeek MoE block's ``count`` shared experts run. ``fused``: as experts
    ``E .. E + count - 1`` of the fused MoE storage (the shared MLP of ``count * I`` is
    exactly ``count`` experts of ``I``: its gate/up rows and down columns split), their ids
    appended to every token's top-k with weight 1.0, so one ``fused_moe`` call computes
    ``routed * routed_scaling_factor + shared`` (the factor is in the routed weights). Else a
    separate MLP added after the routed experts' all-reduce, and ``reason`` says why."""

    count: int
    fused: bool
    reason: str = ""

    def describe(self) -> str:
        """One line for the start-up block."""
        if self.fused:
            return (f"{self.count} shared expert(s) fused into fused_moe as extra experts "
                    "(ids appended to the top-k, weight 1.0)")
        return f"{self.count} shared expert(s) as a separate MLP: {self.reason}"


def shared_experts_path(ctx: LayerContext, prefix: str, count: int, routed: LayerQuant,
                        storage: ExpertStorage) -> SharedExpertsPath:
    """Fuse the shared experts of the MoE block at ``prefix`` when their checkpoint
    tensors can fill expert slots exactly as the routed experts' (``routed``, held as
    ``storage``) do: the same scheme, either unquantized or fp8_block experts kept fp8
    (128-row blocks; a kept storage's ``I`` per rank is a multiple of 128). Every rank holds
    every routed expert (the engine splits experts by tensor parallelism, each rank ``I /
    tp`` of each; it has no expert parallelism), so the shared slots split the same way.
    Falls back to the separate MLP for ``--disable-shared-experts-fusion``, shared experts
    stored otherwise than the routed ones, and quantized experts dequantized at load (the
    shared MLP then keeps its quantized kernels)."""
    if not ctx.fuse_shared_experts:
        return SharedExpertsPath(count, False, "--disable-shared-experts-fusion")
    names = [f"{prefix}.shared_experts.{p}" for p in _SHARED_PROJ]
    shared = [ctx.quant.layer_quant(n) if ctx.quant is not None else UNQUANTIZED
              for n in names]
    for name, quant in zip(names, shared):
        if quant.key() != routed.key():
            return SharedExpertsPath(count, False, f"{name.rpartition('.mlp.')[2]} is stored "
                                     f"as {quant.label}, the routed experts as {routed.label}")
    if routed.scheme == "unquantized" or (routed.scheme == "fp8_block" and storage.kept):
        return SharedExpertsPath(count, True)
    if not storage.kept:
        return SharedExpertsPath(count, False, f"the routed {routed.scheme} experts are "
                                 "dequantized at load; the shared MLP keeps its kernels")
    return SharedExpertsPath(count, False, f"{routed.scheme} shared-expert tensors are not "
                             "split into experts")


class DeepseekMoE(FusedMoE):
    """Routed experts (``FusedMoE`` storage) through ``moe_grouped_topk``, plus shared
    experts (:class:`SharedExpertsPath`: extra experts of the same storage, or a separate
    MLP); the router (``gate``) is fp32, and so is ``e_score_correction_bias`` when the
    router uses one. ``prefix``: the checkpoint name of the block (``model.layers.N.mlp``)."""

    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: DeepseekOptions,
                 prefix: str = "") -> None:
        r, n = opts.routing, opts.num_shared_experts
        routed = FusedMoE.checkpoint_expert_quant(ctx, prefix)
        storage = expert_storage(ctx, routed, opts.moe_intermediate_size // ctx.tp_size,
                                 cfg.hidden_size)
        path = shared_experts_path(ctx, prefix, n, routed, storage) if n else None
        slots = n if path is not None and path.fused else 0
        super().__init__(ctx, r.num_experts + slots, r.top_k, cfg.hidden_size,
                         opts.moe_intermediate_size, r.renormalize, prefix)
        self.routing, self.shared_path, self.num_routed = r, path, r.num_experts
        # the router runs in fp32 whatever the model dtype, as DeepSeek's reference does
        self.gate = ReplicatedLinear(replace(ctx, dtype=torch.float32), cfg.hidden_size,
                                     r.num_experts, bias=False, scheme="unquantized")
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(r.num_experts, dtype=torch.float32, device=ctx.device),
            requires_grad=False) if r.correction_bias else None
        self.shared_experts = MLP(ctx, cfg.hidden_size, opts.moe_intermediate_size * n,
                                  prefix=f"{prefix}.shared_experts") \
            if path is not None and not path.fused else None
        # appended to every token's routing: the shared slots, weight 1.0
        self.register_buffer("shared_ids", torch.arange(
            r.num_experts, r.num_experts + slots, dtype=torch.int32, device=ctx.device),
            persistent=False)
        self.register_buffer("shared_weights", torch.ones(
            slots, dtype=torch.float32, device=ctx.device), persistent=False)
        self._shared_loaded: set[str] = set()

    def load(self, name: str, tensor: torch.Tensor, expert: int | None = None) -> None:
        """``e_score_correction_bias`` (no expert index), else expert ``expert``'s
        ``w1``/``w2``/``w3`` as :meth:`FusedMoE.load`."""
        if name == "e_score_correction_bias":
            if self.e_score_correction_bias is None:
                raise ValueError("e_score_correction_bias in a checkpoint whose topk_method "
                                 "is not noaux_tc")
            self.e_score_correction_bias.data.copy_(tensor.to(torch.float32))
            return
        if expert is None:
            raise ValueError(f"expert weight {name!r} needs an expert index")
        super().load(name, tensor, expert)

    @property
    def fused_shared(self) -> bool:
        return self.shared_path is not None and self.shared_path.fused

    def load_shared(self, proj: str, suffix: str, tensor: torch.Tensor) -> None:
        """Checkpoint tensor ``shared_experts.<proj>.<suffix>`` on the fused path: the
        shared MLP's ``[n * I, H]`` gate/up rows or ``[H, n * I]`` down columns (of an
        fp8_block ``weight_scale_inv``: ``n * I / 128`` block rows or columns) split into
        shared experts ``E .. E + n - 1``. Raises ``ValueError`` when the tensor does not fit
        (wrong name, shape, or a tensor the experts' scheme has not)."""
        if not self.fused_shared:
            raise ValueError("the shared experts are not fused into this MoE block")
        name = _SHARED_PROJ.get(proj)
        if name is None:
            raise ValueError(f"shared experts have no projection {proj!r}")
        n, i = self.shared_path.count, self.inter * self.ctx.tp_size
        per = i // FP8_BLOCK if suffix == "weight_scale_inv" else i
        dim = 1 if name == "w2" else 0
        if tensor.dim() != 2 or tensor.shape[dim] != n * per:
            raise ValueError(f"{suffix}: shape {list(tensor.shape)} does not hold {n} shared "
                             f"experts of {per} along dim {dim}")
        for j in range(n):
            part = tensor.narrow(dim, j * per, per)
            if self.expert_quant.scheme != "unquantized":
                self.load_quantized(name, suffix, part, self.num_routed + j)
            elif suffix == "weight":
                super().load(name, part, self.num_routed + j)
            else:
                raise ValueError(f"unquantized shared experts have no {suffix!r}")
        self._shared_loaded.add(name)

    def check_loaded(self) -> None:
        """As :meth:`FusedMoE.check_loaded`; on the fused path also a
        :class:`ModelLoadError` naming a shared projection the checkpoint lacked."""
        super().check_loaded()
        if self.fused_shared:
            for proj, name in _SHARED_PROJ.items():
                if name not in self._shared_loaded:
                    raise ModelLoadError(f"checkpoint has no {self.prefix}.shared_experts."
                                         f"{proj} tensors")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(self.gate.forward_upcast(x))  # fp32 logits, as DeepSeek's
        out = self.ctx.all_reduce(self.experts(x, weights, ids))  # reference routes
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _greedy(self) -> bool:
        """One group of softmax scores without a bias: plain top-k softmax, the cheaper op
        (V2-Lite's greedy routing)."""
        r = self.routing
        return r.num_groups == 1 and r.scoring == "softmax" and \
            self.e_score_correction_bias is None

    def slots_in_op(self) -> bool:
        """Whether the routing op appends the fused shared experts' slots itself (it declares
        ``MOE_SHARED_SLOTS_ATTR``, and on the greedy path no scaling follows it)."""
        d = self.ctx.dispatch
        if self._greedy():
            return self.routing.routed_scaling_factor == 1.0 and \
                getattr(d.moe_topk_softmax, MOE_SHARED_SLOTS_ATTR, False)
        return getattr(d.moe_grouped_topk, MOE_SHARED_SLOTS_ATTR, False)

    def shared_note(self) -> str:
        """The start-up line of the shared experts' path (how fused slots are appended)."""
        if not self.fused_shared:
            return self.shared_path.describe() if self.shared_path is not None else ""
        how = "by the routing op" if self.slots_in_op() else "by one concatenation"
        return f"{self.shared_path.describe()}, appended {how}"

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights fp32, ids int32)`` of ``[T, k + slots]`` for router ``logits`` fp32
        ``[T, E]``: the routing op's choice, then the fused shared experts' slots (ids ``E
        ..``, weight 1.0), appended by the op where :meth:`slots_in_op`, else by one
        concatenation."""
        d, r = self.ctx.dispatch, self.routing
        slots = self.shared_ids.shape[0]
        in_op = slots > 0 and self.slots_in_op()
        extra = {"shared_experts": slots} if in_op else {}
        if self._greedy():
            weights, ids = d.moe_topk_softmax(logits, r.top_k, r.renormalize, **extra)
            if r.routed_scaling_factor != 1.0:
                weights = weights * r.routed_scaling_factor
        else:
            weights, ids = d.moe_grouped_topk(
                logits, r.top_k, r.renormalize, r.num_groups, r.topk_group, r.scoring,
                self.e_score_correction_bias, r.routed_scaling_factor, **extra)
        if slots and not in_op:
            weights, ids = self._append_shared(weights, ids)
        return weights, ids

    def _append_shared(self, weights: torch.Tensor, ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights fp32 [T, k + n], ids int32 [T, k + n])``: the routed choice
        (``weights`` fp32, ``ids`` int32 ``[T, k]``, the topk ops' contract) followed by the
        ``n`` shared slots at weight 1.0, in one concatenation: both are halves of one int32
        ``[T, 2 (k + n)]`` tensor (the weights by their bits), so each is a view whose rows
        lie ``2 (k + n)`` apart (``fused_moe`` takes rows of any stride)."""
        t, n = ids.shape[0], self.shared_ids.shape[0]
        width = ids.shape[1] + n
        both = torch.cat([weights.to(torch.float32).view(torch.int32),
                          self.shared_weights.view(torch.int32).expand(t, n),
                          ids.to(torch.int32), self.shared_ids.expand(t, n)], dim=1)
        return both[:, :width].view(torch.float32), both[:, width:]


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: DeepseekOptions,
                 layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(ctx, opts.mla, cfg.rms_norm_eps, layer_id,
                                                  opts.softmax_scale, rotary)
        self.post_attention_layernorm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)
        if layer_id < opts.first_k_dense_replace:
            self.mlp: nn.Module = MLP(ctx, cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = DeepseekMoE(ctx, cfg, opts, f"model.layers.{layer_id}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, fwd: ForwardContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(positions, x, fwd), residual)
        return self.mlp(x), residual


class DeepseekBackbone(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: DeepseekOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(ctx, cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(ctx, opts.mla.qk_rope_head_dim, cfg.max_position,
                                 cfg.rope_theta, cfg.rope_scaling, opts.mla.rope_is_neox)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(ctx, cfg, opts, i, rotary)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV2ForCausalLM(CausalLM):
    spec = DecoderSpec(moe_module="mlp")
    v3 = False

    def build_backbone(self, ctx: LayerContext, cfg: ModelConfig) -> nn.Module:
        self.options = DeepseekOptions.from_config(cfg, self.v3)
        return DeepseekBackbone(ctx, cfg, self.options)

    def build_attention_backend(self, page_size: int, device: torch.device,
                                max_batch_size: int, kv_cache_dtype: torch.dtype | None = None
                                ) -> MLABackend:
        """The ``mla_attention`` backend over the latent cache (an fp8 latent cache is not
        supported: ``ValueError``)."""
        if kv_cache_dtype is not None:
            raise ValueError("--kv-cache-dtype fp8_e4m3 is not supported for MLA models "
                             "(the latent cache stays in the model dtype)")
        d, cfg = self.options.mla, self.config
        return self.ctx.dispatch.mla_attention(MLAConfig(
            num_heads=d.num_heads // self.ctx.tp_size, kv_lora_rank=d.kv_lora_rank,
            qk_nope_head_dim=d.qk_nope_head_dim, qk_rope_head_dim=d.qk_rope_head_dim,
            v_head_dim=d.v_head_dim, page_size=page_size, dtype=cfg.dtype, device=device,
            max_batch_size=max_batch_size, max_context_len=cfg.context_len))

    def _target(self, name: str) -> tuple[str, str, object]:
        if name.endswith(".gate.e_score_correction_bias"):
            return name[: -len(".gate.e_score_correction_bias")], "e_score_correction_bias", None
        m = _QKV_A.match(name)
        if m is not None and self._fused_qkv_a(m.group(1)):
            shard = 1 if m.group(2) == "kv_a_proj_with_mqa" else 0
            return f"{m.group(1)}.fused_qkv_a_proj_with_mqa", m.group(3), shard
        if ".self_attn.q_proj." in name:  # no q LoRA: a plain projection, not fused qkv
            module, _, param = name.rpartition(".")
            return module, param, None
        return super()._target(name)

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """As :meth:`CausalLM.load_weights`, skipping V3's multi-token-prediction layers;
        ``shared_experts.*`` tensors of a block whose shared experts are fused go to its
        expert slots (:meth:`DeepseekMoE.load_shared`)."""
        n = self.config.num_layers
        filled: set[str] = set()

        def main_layers() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                m = _LAYER.match(name)
                if m is not None and int(m.group(1)) >= n:
                    continue
                shared = _SHARED.match(name)
                moe = self._fused_shared_moe(shared.group(1)) if shared else None
                if moe is None:
                    yield name, tensor
                    continue
                try:
                    moe.load_shared(shared.group(2), shared.group(3), tensor)
                except ModelLoadError:
                    raise
                except ValueError as exc:
                    raise ModelLoadError(f"checkpoint tensor {name}: {exc}") from None
                filled.add(f"{shared.group(1)}.w13")

        return super().load_weights(main_layers()) | filled

    def _fused_qkv_a(self, path: str) -> bool:
        """Whether the attention at ``path`` runs q (or q_a) and kv_a as one projection."""
        try:
            module = self.get_submodule(path)
        except AttributeError:
            return False
        return isinstance(module, MultiHeadLatentAttention) and \
            module.fused_qkv_a_proj_with_mqa is not None

    def _fused_shared_moe(self, path: str) -> DeepseekMoE | None:
        """The MoE block at ``path`` when its shared experts are fused, else None."""
        try:
            module = self.get_submodule(path)
        except AttributeError:
            return None
        return module if isinstance(module, DeepseekMoE) and module.fused_shared else None

    def startup_notes(self) -> list[str]:
        """Whether q (or q_a) and kv_a run as one projection, and which path the shared
        experts take (one line per distinct choice), then the fused MoE's own notes."""
        seen: dict[str, None] = {}
        for m in self.modules():
            if isinstance(m, MultiHeadLatentAttention):
                q = "q_proj" if m.dims.q_lora_rank is None else "q_a_proj"
                seen.setdefault(f"{q} + kv_a_proj_with_mqa as one projection" if
                                m.qkv_a_refusal is None else f"{q} and kv_a_proj_with_mqa "
                                f"separate: {m.qkv_a_refusal}")
            elif isinstance(m, DeepseekMoE) and m.shared_path is not None:
                seen.setdefault(m.shared_note())
        return list(seen) + super().startup_notes()


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    v3 = True
