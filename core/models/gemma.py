"""Gemma 2 and Gemma 3 (text): the decoder with Gemma's differences.

- RMSNorm scales by ``1 + w`` (:class:`OffsetRMSNorm`), and every block has four norms: the
  attention and MLP outputs are normed before they join the residual stream. Each such
  post-norm runs as one op with the pre-norm after it (``norm_add_norm``), so a layer takes
  its input already normed.
- Embeddings are multiplied by ``sqrt(hidden_size)`` (rounded to the model dtype, as
  transformers does); the MLP is GeGLU (``gelu_and_mul`` with the tanh approximation).
- Attention scale is ``query_pre_attn_scalar ** -0.5``; scores may be soft-capped
  (``attn_logit_softcapping``, Gemma 2) and logits too (``final_logit_softcapping``).
- Layers alternate between local (sliding window) and global attention (``layer_types``,
  else Gemma 2's even/odd or Gemma 3's ``sliding_window_pattern``), each type with its own
  rope base (Gemma 3: ``rope_local_base_freq`` or per-type ``rope_parameters``); Gemma 3 norms
  q and k per head before RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from heteroserve.core.layers.attention import PagedAttention
from heteroserve.core.layers.context import ForwardContext, LayerContext
from heteroserve.core.layers.embedding import VocabParallelEmbedding
from heteroserve.core.layers.linear import (
    MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from heteroserve.core.layers.norm import OffsetRMSNorm
from heteroserve.core.layers.rotary import RotaryEmbedding
from heteroserve.core.model_runner.forward_batch import ForwardBatch
from heteroserve.core.models.config import ModelConfig, ModelLoadError
from heteroserve.core.models.decoder import CausalLM

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class RopeChoice:
    """One layer type's rotary parameters: ``theta`` and the transformers-style scaling dict
    (None for plain RoPE)."""

    theta: float
    scaling: dict[str, Any] | None


@dataclass(frozen=True)
class GemmaOptions:
    """Gemma facts read from ``config.json``, per family (``qk_norm`` is Gemma 3's)."""

    sliding: tuple[bool, ...]
    local_rope: RopeChoice
    global_rope: RopeChoice
    scale: float
    attn_softcap: float | None
    final_softcap: float | None
    approximate: str
    qk_norm: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig, qk_norm: bool, default_pattern: int) -> GemmaOptions:
        raw = cfg.raw
        if raw.get("use_bidirectional_attention"):
            raise ModelLoadError(f"{cfg.path}: use_bidirectional_attention (embedding "
                                 "models) is not supported")
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"{cfg.path}: hidden_activation {act!r} is not supported "
                                 f"(supported: {', '.join(_ACTIVATIONS)})")
        local, global_ = _ropes(cfg)
        return cls(sliding=_sliding_layers(cfg, default_pattern), local_rope=local,
                   global_rope=global_,
                   scale=float(raw.get("query_pre_attn_scalar") or cfg.head_dim) ** -0.5,
                   attn_softcap=raw.get("attn_logit_softcapping"),
                   final_softcap=raw.get("final_logit_softcapping"),
                   approximate=_ACTIVATIONS[act], qk_norm=qk_norm)


def _sliding_layers(cfg: ModelConfig, default_pattern: int) -> tuple[bool, ...]:
    """Which layers use the sliding window: ``layer_types`` when the config has it, else
    every ``pattern``-th layer (1-based) is global (Gemma 2: 2, Gemma 3: 6)."""
    raw = cfg.raw
    types = raw.get("layer_types")
    if types:
        if len(types) != cfg.num_layers:
            raise ModelLoadError(f"{cfg.path}: layer_types has {len(types)} entries for "
                                 f"{cfg.num_layers} layers")
        return tuple(t == "sliding_attention" for t in types)
    pattern = int(raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
                  or default_pattern)
    return tuple((i + 1) % pattern != 0 for i in range(cfg.num_layers))


def _rope_choice(params: dict[str, Any], default_theta: float) -> RopeChoice:
    theta = float(params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeChoice(theta, None)
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return RopeChoice(theta, scaling)


def _ropes(cfg: ModelConfig) -> tuple[RopeChoice, RopeChoice]:
    """(local, global) rope: per-type ``rope_parameters`` (transformers 5), else the global
    ``rope_theta``/``rope_scaling`` and ``rope_local_base_freq`` (unscaled) for local."""
    params = cfg.raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = params["full_attention"]
        local = params.get("sliding_attention") or full
        return _rope_choice(local, cfg.rope_theta), _rope_choice(full, cfg.rope_theta)
    global_ = RopeChoice(cfg.rope_theta, cfg.rope_scaling)
    local_theta = cfg.raw.get("rope_local_base_freq")
    local = global_ if local_theta is None else RopeChoice(float(local_theta), None)
    return local, global_


class GemmaAttention(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: GemmaOptions, layer_id: int,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(ctx, cfg.hidden_size, hd, cfg.num_heads,
                                          cfg.num_kv_heads, bool(cfg.raw.get("attention_bias")))
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size, self.head_dim = heads * hd, kv_heads * hd, hd
        self.o_proj = RowParallelLinear(ctx, cfg.num_heads * hd, cfg.hidden_size,
                                        bias=bool(cfg.raw.get("attention_bias")))
        self.q_norm = OffsetRMSNorm(ctx, hd, cfg.rms_norm_eps) if opts.qk_norm else None
        self.k_norm = OffsetRMSNorm(ctx, hd, cfg.rms_norm_eps) if opts.qk_norm else None
        self.rotary_emb = rotary
        window = cfg.sliding_window if opts.sliding[layer_id] else None
        self.attn = PagedAttention(layer_id, heads, kv_heads, hd, opts.scale, window,
                                   opts.attn_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, fwd: ForwardContext
                ) -> torch.Tensor:
        """``x [T, hidden]`` (normed) -> attention output through ``o_proj``."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, -1, self.head_dim)
        k = k.reshape(t, -1, self.head_dim)
        # OffsetRMSNorm weights hold 1 + w: the effective weight
        prologue = self.rotary_emb.prologue(positions, self.q_norm, self.k_norm)
        o = self.attn.forward_prologue(q, k, v, prologue, fwd)
        if o is not None:  # the backend normed and rotated q / k itself
            return self.o_proj(o)
        if self.q_norm is not None:
            q, k = self.rotary_emb.forward_qk_norm(positions, q, k, self.q_norm, self.k_norm)
        else:
            q, k = self.rotary_emb(positions, q.contiguous(), k.contiguous())
        o = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous(), fwd)
        return self.o_proj(o)


class GemmaMLP(nn.Module):
    """GeGLU: ``down(gelu(gate(x), approximate) * up(x))``."""

    def __init__(self, ctx: LayerContext, hidden: int, inter: int, approximate: str) -> None:
        super().__init__()
        self.ctx, self.approximate = ctx, approximate
        self.gate_up_proj = MergedColumnParallelLinear(ctx, hidden, [inter, inter], bias=False)
        self.down_proj = RowParallelLinear(ctx, inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The activation fused after ``gate_up_proj`` where its linear method can."""
        fused = "gelu_tanh" if self.approximate == "tanh" else "gelu"
        activated = self.gate_up_proj.fused_gated(x, fused)
        if activated is None:
            activated = self.ctx.dispatch.gelu_and_mul(self.gate_up_proj(x), self.approximate)
        return self.down_proj(activated)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: GemmaOptions, layer_id: int,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        norm = lambda: OffsetRMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = GemmaAttention(ctx, cfg, opts, layer_id, rotary)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GemmaMLP(ctx, cfg.hidden_size, cfg.intermediate_size, opts.approximate)
        self.post_feedforward_layernorm = norm()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                fwd: ForwardContext, next_norm: OffsetRMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the stream ``residual`` normed by this layer's ``input_layernorm``. Returns
        ``(next_norm(stream), stream)`` for the stream after this layer. Each post-norm is
        fused with the pre-norm after it (``pre_feedforward_layernorm``; ``next_norm``, the
        next layer's ``input_layernorm`` or the final norm): one op for norm, add, norm."""
        attn = self.self_attn(positions, x, fwd)
        x, residual = self.post_attention_layernorm.forward_add_norm(
            attn, residual, self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm.forward_add_norm(self.mlp(x), residual,
                                                                next_norm)


class GemmaBackbone(nn.Module):
    """Embedding, layers sharing one rotary module per layer type, final norm."""

    def __init__(self, ctx: LayerContext, cfg: ModelConfig, opts: GemmaOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(ctx, cfg.vocab_size, cfg.hidden_size)
        rotary = {
            sliding: RotaryEmbedding(ctx, cfg.head_dim, cfg.max_position, choice.theta,
                                     choice.scaling)
            for sliding, choice in ((True, opts.local_rope), (False, opts.global_rope))
            if sliding in opts.sliding}
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(ctx, cfg, opts, i, rotary[opts.sliding[i]])
            for i in range(cfg.num_layers))
        self.norm = OffsetRMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)
        scale = torch.tensor(math.sqrt(cfg.hidden_size), dtype=ctx.dtype)
        self.register_buffer("embed_scale", scale.to(ctx.device), persistent=False)


class _GemmaCausalLM(CausalLM):
    qk_norm = False
    default_pattern = 2

    def build_backbone(self, ctx: LayerContext, cfg: ModelConfig) -> nn.Module:
        self.options = GemmaOptions.from_config(cfg, self.qk_norm, self.default_pattern)
        return GemmaBackbone(ctx, cfg, self.options)

    def forward(self, batch: ForwardBatch, fwd: ForwardContext) -> torch.Tensor:
        residual = self.model.embed_tokens(batch.input_ids) * self.model.embed_scale
        layers = self.model.layers
        x = layers[0].input_layernorm(residual)
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, residual = layer(batch.positions, x, residual, fwd, next_norm)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.logits(hidden)
        cap = self.options.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma2ForCausalLM(_GemmaCausalLM):
    qk_norm = False
    default_pattern = 2


class Gemma3ForCausalLM(_GemmaCausalLM):
    qk_norm = True
    default_pattern = 6


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """A multimodal Gemma 3 checkpoint served as text only: the language model's weights
    (``language_model.model.*``, or transformers 5's ``model.language_model.*``) load under
    Gemma 3's names; the vision tower and projector are skipped (image input is not
    supported)."""

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def text_only() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in tensors:
                if name.startswith(_VISION_PREFIXES):
                    continue
                for old, new in _TEXT_PREFIXES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                yield name, tensor

        return super().load_weights(text_only())
