"""Multi-head latent attention (DeepSeek-V2/V3): projections here, attention through the
engine's MLA backend (contract: ``core/kernels/mla.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.core.kernels.mla import MLALayer, MLAPrologue
from heteroserve.core.layers.context import ForwardContext, LayerContext
from heteroserve.core.layers.linear import (
    ColumnParallelLinear, MergedReplicatedLinear, ReplicatedLinear, RowParallelLinear,
)
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.layers.rotary import RotaryEmbedding
from heteroserve.core.quantization.dequantize import dequantize


@dataclass(frozen=True)
class MLADims:
    """MLA widths from the model config. ``q_lora_rank`` None: q is one projection of the
    hidden state; else a low-rank pair with an RMSNorm between. ``rope_is_neox``: the rotary
    dims rotate as halves (else as interleaved pairs, DeepSeek's layout)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    rope_is_neox: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLAUpProjection(nn.Module):
    """``kv_b_proj``: the checkpoint's ``[H * (qk_nope + v), kv_lora_rank]`` weight kept per
    head as ``w_kc [H/tp, qk_nope, kv_lora_rank]`` and ``w_vc [H/tp, v, kv_lora_rank]`` (this
    rank's heads), the form the MLA backend takes.

    An FP8-block checkpoint (DeepSeek-V3/R1) stores it as e4m3 ``weight`` plus
    ``weight_scale_inv [ceil(N/128), ceil(K/128)]``: both are held until the other arrives,
    then dequantized into the model dtype (the absorbed form multiplies queries and outputs by
    these per-head matrices, not a linear layer's input). :meth:`check_loaded` raises when
    half of such a pair never came."""

    def __init__(self, ctx: LayerContext, dims: MLADims) -> None:
        super().__init__()
        self.ctx, self.dims = ctx, dims
        if dims.num_heads % ctx.tp_size:
            raise ValueError(f"num_attention_heads={dims.num_heads} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size}")
        self.heads = dims.num_heads // ctx.tp_size
        make = lambda *shape: nn.Parameter(  # noqa: E731
            torch.empty(*shape, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.w_kc = make(self.heads, dims.qk_nope_head_dim, dims.kv_lora_rank)
        self.w_vc = make(self.heads, dims.v_head_dim, dims.kv_lora_rank)
        self._fp8_parts: dict[str, torch.Tensor] = {}

    def load(self, name: str, tensor: torch.Tensor, shard: object = None) -> None:
        d = self.dims
        want = (d.num_heads * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank)
        fp8_weight = name == "weight" and tensor.dtype.itemsize == 1 and tensor.is_floating_point()
        if name not in ("weight", "weight_scale_inv"):
            raise ValueError(f"kv_b_proj has no parameter {name!r} (of quantized formats only "
                             "FP8-block weight + weight_scale_inv is supported)")
        if tuple(tensor.shape) != want and name == "weight":
            raise ValueError(f"kv_b_proj.weight: checkpoint shape {list(tensor.shape)} does not "
                             f"match {list(want)}")
        if fp8_weight or name == "weight_scale_inv":
            blocks = tuple(-(-n // FP8_BLOCK) for n in want)
            if name == "weight_scale_inv" and tuple(tensor.shape) != blocks:
                raise ValueError(f"kv_b_proj.weight_scale_inv: checkpoint shape "
                                 f"{list(tensor.shape)} does not match {list(blocks)} (128x128 "
                                 "blocks of the weight)")
            self._fp8_parts[name] = tensor
            if len(self._fp8_parts) < 2:
                return
            tensor = dequantize("fp8_block", self._fp8_parts, -1)
            self._fp8_parts = {}
        start = self.ctx.tp_rank * self.heads
        per_head = tensor.view(d.num_heads, -1, d.kv_lora_rank)[start:start + self.heads]
        self.w_kc.data.copy_(per_head[:, :d.qk_nope_head_dim].to(self.w_kc.dtype))
        self.w_vc.data.copy_(per_head[:, d.qk_nope_head_dim:].to(self.w_vc.dtype))

    def check_loaded(self) -> None:
        """Raise ``ValueError`` when an FP8-block weight came without its scales (or the
        reverse)."""
        if self._fp8_parts:
            have = next(iter(self._fp8_parts))
            other = "weight_scale_inv" if have == "weight" else "weight"
            raise ValueError(f"kv_b_proj: checkpoint has {have} but no {other}")


class MultiHeadLatentAttention(nn.Module):
    """Hugging Face's DeepSeek attention module names (``q_proj`` or ``q_a_proj`` /
    ``q_a_layernorm`` / ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
    ``kv_b_proj``, ``o_proj``); ``forward(positions, x [T, hidden], fwd)`` -> ``[T, hidden]``.

    ``q_proj`` (or ``q_a_proj``) and ``kv_a_proj_with_mqa`` read the same ``x``: they run as
    one :class:`MergedReplicatedLinear`, ``fused_qkv_a_proj_with_mqa`` (the checkpoint's two
    tensors fill its rows), whose output is split by views; separately where
    :attr:`qkv_a_refusal` says why (``q_proj`` column-parallel at tp > 1, or what
    :meth:`MergedReplicatedLinear.refusal` finds in the checkpoint's quantization)."""

    def __init__(self, ctx: LayerContext, dims: MLADims, eps: float, layer_id: int,
                 scale: float, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.dims = dims
        prefix = f"model.layers.{layer_id}.self_attn"
        q_out = dims.num_heads * dims.qk_head_dim
        kv_a_out = dims.kv_lora_rank + dims.qk_rope_head_dim
        q_name, q_rows = ("q_proj", q_out) if dims.q_lora_rank is None else \
            ("q_a_proj", dims.q_lora_rank)
        sources = [f"{prefix}.{q_name}", f"{prefix}.kv_a_proj_with_mqa"]
        if dims.q_lora_rank is None and ctx.tp_size > 1:
            self.qkv_a_refusal: str | None = f"q_proj is column-parallel (tp {ctx.tp_size})"
        else:
            self.qkv_a_refusal = MergedReplicatedLinear.refusal(
                ctx, dims.hidden_size, [q_rows, kv_a_out], sources)
        self.split_sizes = [q_rows, dims.kv_lora_rank, dims.qk_rope_head_dim]
        self.fused_qkv_a_proj_with_mqa: MergedReplicatedLinear | None = None
        if self.qkv_a_refusal is None:
            # q (or q_a) and kv_a read the same x: one projection, split by views
            self.fused_qkv_a_proj_with_mqa = MergedReplicatedLinear(
                ctx, dims.hidden_size, [q_rows, kv_a_out], dims.attention_bias, sources)
        elif dims.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(ctx, dims.hidden_size, q_out, bias=False,
                                               prefix=sources[0])
        else:
            self.q_a_proj = ReplicatedLinear(ctx, dims.hidden_size, dims.q_lora_rank,
                                             bias=dims.attention_bias, prefix=sources[0])
        if dims.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(ctx, dims.q_lora_rank, eps)
            self.q_b_proj = ColumnParallelLinear(ctx, dims.q_lora_rank, q_out, bias=False,
                                                 prefix=f"{prefix}.q_b_proj")
        if self.fused_qkv_a_proj_with_mqa is None:
            self.kv_a_proj_with_mqa = ReplicatedLinear(
                ctx, dims.hidden_size, kv_a_out, bias=dims.attention_bias, prefix=sources[1])
        self.kv_a_layernorm = RMSNorm(ctx, dims.kv_lora_rank, eps)
        self.kv_b_proj = MLAUpProjection(ctx, dims)
        self.o_proj = RowParallelLinear(ctx, dims.num_heads * dims.v_head_dim, dims.hidden_size,
                                        bias=dims.attention_bias, prefix=f"{prefix}.o_proj")
        self.rotary_emb = rotary
        self.attn = MLALayer(layer_id, scale)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, fwd: ForwardContext
                ) -> torch.Tensor:
        d, t = self.dims, x.shape[0]
        if self.fused_qkv_a_proj_with_mqa is not None:
            q, latent, k_pe = self.fused_qkv_a_proj_with_mqa(x).split(self.split_sizes, dim=-1)
        else:
            q = self.q_proj(x) if d.q_lora_rank is None else self.q_a_proj(x)
            latent, k_pe = self.kv_a_proj_with_mqa(x).split(self.split_sizes[1:], dim=-1)
        if d.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(t, -1, d.qk_head_dim)
        q_nope, q_pe = q.split([d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)
        cache, backend = fwd.k_caches[self.attn.layer_id], fwd.backend
        if backend.strided_inputs:  # the backend may fold the latent norm and rotary in
            prologue = MLAPrologue(self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                                   positions, self.rotary_emb.cos_sin_cache,
                                   self.rotary_emb.is_neox)
            o = backend.forward_prologue(q_nope, q_pe, latent, k_pe, prologue, cache,
                                         self.kv_b_proj.w_kc, self.kv_b_proj.w_vc, self.attn,
                                         fwd.meta)
            if o is not None:
                return self.o_proj(o.reshape(t, -1))
        # strided views of the projections through the norm and rotary (their contracts take
        # rows of any stride); dense copies only for an MLA backend that wants them
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        k_pe = k_pe.squeeze(1)
        if not backend.strided_inputs:
            q_nope, q_pe, k_pe = q_nope.contiguous(), q_pe.contiguous(), k_pe.contiguous()
        o = backend.forward(q_nope, q_pe, latent, k_pe, cache, self.kv_b_proj.w_kc,
                            self.kv_b_proj.w_vc, self.attn, fwd.meta)
        return self.o_proj(o.reshape(t, -1))
