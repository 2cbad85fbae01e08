"""The decoder-only transformer shared by every supported architecture.

An architecture is a :class:`DecoderSpec` (qkv bias, per-head q/k norm, dense MLP or MoE)
plus a weight-name mapping; its module names mirror Hugging Face's so checkpoints load by
name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from heteroserve.core.kernels.attention import AttentionBackend, AttentionConfig
from heteroserve.core.kernels.mla import MLABackend
from heteroserve.core.layers.attention import PagedAttention
from heteroserve.core.layers.context import ForwardContext, LayerContext
from heteroserve.core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from heteroserve.core.layers.linear import (
    MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from heteroserve.core.layers.moe import FusedMoE
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.layers.rotary import RotaryEmbedding
from heteroserve.core.model_runner.forward_batch import ForwardBatch
from heteroserve.core.models.config import ModelConfig, ModelLoadError


@dataclass(frozen=True)
class DecoderSpec:
    """What distinguishes one architecture's decoder layer from another's."""

    qkv_bias: bool = False
    qk_norm: bool = False
    moe_module: str | None = None  # attribute name of the MoE block ("block_sparse_moe", "mlp")
    use_sliding_window: bool = False


class SelfAttention(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, spec: DecoderSpec, layer_id: int) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_id}.self_attn"
        self.qkv_proj = QKVParallelLinear(
            ctx, cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, spec.qkv_bias,
            source_names=(f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"))
        heads, kv_heads, hd = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size, self.head_dim = heads * hd, kv_heads * hd, hd
        self.o_proj = RowParallelLinear(ctx, cfg.num_heads * hd, cfg.hidden_size, bias=False,
                                        prefix=f"{prefix}.o_proj")
        self.q_norm = RMSNorm(ctx, hd, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(ctx, hd, cfg.rms_norm_eps) if spec.qk_norm else None
        rotary_dim = int(hd * cfg.raw.get("partial_rotary_factor", 1.0))
        self.rotary_emb = RotaryEmbedding(ctx, rotary_dim, cfg.max_position, cfg.rope_theta,
                                          cfg.rope_scaling)
        window = cfg.sliding_window if spec.use_sliding_window else None
        self.attn = PagedAttention(layer_id, heads, kv_heads, hd, hd ** -0.5, window)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, fwd: ForwardContext
                ) -> torch.Tensor:
        """``qkv [T, q + 2 kv]`` (this layer's ``qkv_proj`` output) -> attention output
        through ``o_proj`` ``[T, hidden]``."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, -1, self.head_dim)
        k = k.reshape(t, -1, self.head_dim)
        # strided views of qkv all the way down: the qk-norm, rotary and attention contracts
        # take rows with any stride (last dim contiguous), so no per-layer copies
        prologue = self.rotary_emb.prologue(positions, self.q_norm, self.k_norm)
        o = self.attn.forward_prologue(q, k, v, prologue, fwd)
        if o is not None:  # the backend normed and rotated q / k itself
            return self.o_proj(o)
        if self.q_norm is not None:
            q, k = self.rotary_emb.forward_qk_norm(positions, q, k, self.q_norm, self.k_norm)
        else:
            q, k = self.rotary_emb(positions, q, k)
        o = self.attn(q.reshape(t, -1), k.reshape(t, -1), v, fwd)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, ctx: LayerContext, hidden: int, inter: int, prefix: str = "") -> None:
        super().__init__()
        self.ctx = ctx
        self.gate_up_proj = MergedColumnParallelLinear(
            ctx, hidden, [inter, inter], bias=False,
            source_names=[f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj = RowParallelLinear(ctx, inter, hidden, bias=False,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate(x)) * up(x))``: the activation fused after ``gate_up_proj`` where
        its linear method can, else in front of ``down_proj`` where that one can."""
        activated = self.gate_up_proj.fused_gated(x, "silu")
        if activated is not None:
            return self.down_proj(activated)
        return self.down_proj.forward_silu_and_mul(self.gate_up_proj(x))

    def forward_rms_norm(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(norm(x + residual)), x + residual)``, the norm fused into ``gate_up_proj``
        where the linear method can."""
        gate_up, residual = self.gate_up_proj.forward_rms_norm(norm, x, residual)
        return self.down_proj.forward_silu_and_mul(gate_up), residual


class DecoderLayer(nn.Module):
    def __init__(self, ctx: LayerContext, cfg: ModelConfig, spec: DecoderSpec, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(ctx, cfg, spec, layer_id)
        self.post_attention_layernorm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)
        if spec.moe_module:
            moe = FusedMoE(ctx, cfg.num_experts, cfg.top_k, cfg.hidden_size,
                           cfg.moe_intermediate_size, cfg.norm_topk_prob,
                           prefix=f"model.layers.{layer_id}.{spec.moe_module}")
            setattr(self, spec.moe_module, moe)
            self.feed_forward: nn.Module = moe
        else:
            self.mlp = MLP(ctx, cfg.hidden_size, cfg.intermediate_size,
                           prefix=f"model.layers.{layer_id}.mlp")
            self.feed_forward = self.mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, fwd: ForwardContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block: ``(hidden, residual)`` in, ``(block output, residual)`` out; the
        layer's input is ``hidden + residual`` (``hidden`` alone for the first layer). The
        norms go into the following projection when its linear method fuses them."""
        qkv, residual = self.self_attn.qkv_proj.forward_rms_norm(self.input_layernorm, hidden,
                                                                 residual)
        hidden = self.self_attn(positions, qkv, fwd)
        if isinstance(self.feed_forward, MLP):
            return self.feed_forward.forward_rms_norm(self.post_attention_layernorm, hidden,
                                                      residual)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual


class _Backbone(nn.Module):
    def __init__(self, ctx, cfg, spec) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(ctx, cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(ctx, cfg, spec, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(ctx, cfg.hidden_size, cfg.rms_norm_eps)


_STACKED = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"),
            (".v_proj.", ".qkv_proj.", "v"), (".gate_proj.", ".gate_up_proj.", 0),
            (".up_proj.", ".gate_up_proj.", 1)]
_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.(\w+)$")
_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class CausalLM(nn.Module):
    """``forward(batch, fwd) -> hidden [T, H]``; ``compute_logits(hidden [B, H]) -> fp32
    [B, vocab]``; ``load_weights(named tensors)`` places checkpoint tensors by name."""

    spec = DecoderSpec()

    def __init__(self, ctx: LayerContext, cfg: ModelConfig) -> None:
        super().__init__()
        self.ctx, self.config = ctx, cfg
        self.model = self.build_backbone(ctx, cfg)
        self.lm_head = ParallelLMHead(ctx, cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def build_attention_backend(self, page_size: int, device: torch.device,
                                max_batch_size: int, kv_cache_dtype: torch.dtype | None = None
                                ) -> AttentionBackend | MLABackend:
        """The engine's attention backend for this model's layers (the dispatch table's
        ``attention`` class here; latent-attention models pick ``mla_attention``).
        ``kv_cache_dtype``: the KV pool's dtype when it differs from the model's (fp8)."""
        attn = self.model.layers[0].self_attn.attn
        cfg = self.config
        return self.ctx.dispatch.attention(AttentionConfig(
            num_q_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads, head_size=cfg.head_dim,
            page_size=page_size, dtype=cfg.dtype, device=device, max_batch_size=max_batch_size,
            max_context_len=cfg.context_len, kv_cache_dtype=kv_cache_dtype))

    def build_backbone(self, ctx: LayerContext, cfg: ModelConfig) -> nn.Module:
        """The ``model`` submodule: ``embed_tokens``, ``layers`` (each with a ``self_attn``
        whose ``attn`` is the attention layer) and the final ``norm``. Families with their own
        layers override this."""
        return _Backbone(ctx, cfg, self.spec)

    def forward(self, batch: ForwardBatch, fwd: ForwardContext) -> torch.Tensor:
        hidden = self.model.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(batch.positions, hidden, residual, fwd)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def startup_notes(self) -> list[str]:
        """Lines for the start-up block on paths the model chose at build time (fused
        projections or experts, and why not where it fell back): by default what the fused
        MoE implementation says of the model's experts (one line per distinct note)."""
        notes = (m.kernel_note() for m in self.modules() if isinstance(m, FusedMoE))
        return list(dict.fromkeys(n for n in notes if n))

    def _target(self, name: str) -> tuple[str, str, object]:
        """Map a checkpoint name to ``(module path, parameter name, shard)``."""
        m = _EXPERT.match(name)
        if m and m.group(4) == "weight":
            return m.group(1), _EXPERT_NAMES.get(m.group(3), m.group(3)), int(m.group(2))
        shard = None
        for old, new, sid in _STACKED:
            if old in name and (self.spec.moe_module is None or ".experts." not in name):
                name, shard = name.replace(old, new), sid
                break
        module, _, param = name.rpartition(".")
        return module, param, shard

    def _quantized_moe(self, path: str) -> FusedMoE | None:
        """The MoE block at ``path`` when its experts are stored quantized, else None."""
        try:
            module = self.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, FusedMoE) and module.expert_quant.scheme != "unquantized":
            return module
        return None

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load every tensor; returns the set of module parameters that were filled.
        Raises :class:`ModelLoadError` for a name the model has no place for."""
        filled: set[str] = set()
        kv_scales: dict[str, dict[str, float]] = {}
        for name, tensor in tensors:
            if "rotary_emb.inv_freq" in name:
                continue
            if name.endswith((".k_scale", ".v_scale")):
                if tensor.numel() != 1:
                    raise ModelLoadError(f"checkpoint tensor {name}: a per-layer KV scale has "
                                         f"one value, got shape {list(tensor.shape)}")
                kv_scales.setdefault(name.rsplit(".", 1)[0], {})[name[-7:]] = float(tensor)
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            expert = _EXPERT.match(name)
            moe = self._quantized_moe(expert.group(1)) if expert else None
            if expert and moe is not None:
                proj = _EXPERT_NAMES.get(expert.group(3), expert.group(3))
                try:
                    moe.load_quantized(proj, expert.group(4), tensor, int(expert.group(2)))
                except ModelLoadError:
                    raise
                except ValueError as exc:
                    raise ModelLoadError(f"checkpoint tensor {name}: {exc}") from None
                filled.add(f"{expert.group(1)}.w13")
                continue
            module_path, param, shard = self._target(name)
            try:
                module = self.get_submodule(module_path)
            except AttributeError:
                raise ModelLoadError(f"checkpoint tensor {name} has no matching module") from None
            try:
                module.load(param, tensor, shard)
            except ModelLoadError:
                raise
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name}: {exc}") from None
            filled.add(f"{module_path}.{param}")
        self._set_kv_scales(kv_scales)
        return filled

    def _set_kv_scales(self, scales: dict[str, dict[str, float]]) -> None:
        """Checkpoint ``<layer>.self_attn[.k_proj|.v_proj|.attn].k_scale`` / ``v_scale``: used
        with an fp8 KV cache (``ctx.kv_cache_fp8``), ignored otherwise."""
        if not self.ctx.kv_cache_fp8 or not scales:
            return
        for i, layer in enumerate(self.model.layers):
            base = f"model.layers.{i}.self_attn"
            found = {k: v for path, kv in scales.items() if path.startswith(base + ".")
                     or path == base for k, v in kv.items()}
            if found:
                layer.self_attn.attn.set_kv_scales(found.get("k_scale", 1.0),
                                                   found.get("v_scale", 1.0))

    def expected_tensors(self) -> int:
        return sum(1 for _ in self.parameters())
