"""The multi-head latent attention (MLA) contract: DeepSeek-V2/V3's attention over a
compressed KV cache.

Per token the cache holds one *latent* row ``[c_kv | k_pe]`` of width
``kv_lora_rank + qk_rope_head_dim`` (``c_kv`` is the normed KV compression, ``k_pe`` the
rotated key part shared by all heads), in one tensor per layer of shape
``[num_pages, page_size, kv_lora_rank + qk_rope_head_dim]`` (:attr:`KVLayout.LATENT`), paged
exactly like :mod:`heteroserve.core.kernels.attention` (same :class:`AttentionMetadata`,
slots, reserved page 0).

Per query head ``h`` the keys and values are up-projections of ``c_kv``:
``k_nope[h] = w_kc[h] @ c_kv`` (``w_kc [H, qk_nope_head_dim, kv_lora_rank]``) and
``v[h] = w_vc[h] @ c_kv`` (``w_vc [H, v_head_dim, kv_lora_rank]``); the score of query ``t``
against key ``s`` is ``scale * (q_nope[t,h] . k_nope[s,h] + q_pe[t,h] . k_pe[s])``, causal
within the sequence, softmax in fp32, output ``sum_s p[t,h,s] * v[s,h]`` ``[T, H, v_head_dim]``.
How an implementation computes this is its own choice; the reference one up-projects K/V for
prefill (``extend``) and absorbs ``w_kc``/``w_vc`` into the query and output for ``decode``
(scores ``(q_nope[h] @ w_kc[h]) . c_kv``, output ``w_vc[h] @ (sum_s p * c_kv[s])``), which reads
only the latent cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.platform import KVLayout


@dataclass(frozen=True)
class MLAConfig:
    """Model-wide MLA facts, fixed when the engine is built. ``num_heads`` is this rank's
    query heads; all widths are positive; ``qk_rope_head_dim`` is even."""

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    page_size: int
    dtype: torch.dtype
    device: torch.device
    max_batch_size: int = 256
    max_context_len: int = 8192

    @property
    def latent_dim(self) -> int:
        """Width of one cached token: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def cache_dtype(self) -> torch.dtype:
        """The latent cache's dtype: the model's (no fp8 latent cache)."""
        return self.dtype


@dataclass(frozen=True)
class MLAPrologue:
    """The two ops between DeepSeek's projections and MLA, for an implementation to fold in
    (:meth:`MLABackend.forward_prologue`): ``latent`` arrives un-normed and ``q_pe`` /
    ``k_pe`` un-rotated, and mean ``rms_norm(latent, norm_weight, eps)`` and
    ``rotary_embedding(positions, q_pe, k_pe[:, None], cos_sin_cache, is_neox)`` as those ops'
    contracts define them (fp32 math, results rounded to the model dtype).
    ``norm_weight [kv_lora_rank]`` (model dtype), ``positions`` int64 ``[T]``,
    ``cos_sin_cache`` fp32 ``[max_position, R]`` with ``R == qk_rope_head_dim``."""

    norm_weight: torch.Tensor
    eps: float
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool


@dataclass(frozen=True)
class MLALayer:
    """Per-layer parameters: ``scale`` multiplies the score (``qk_head_dim ** -0.5``, times
    YaRN's ``mscale ** 2`` when the model uses it)."""

    layer_id: int
    scale: float


class MLABackend(ABC):
    """An MLA implementation, built once per engine from an :class:`MLAConfig`.

    Tensors (``config.dtype`` unless stated): ``q_nope [T, H, qk_nope_head_dim]``,
    ``q_pe [T, H, qk_rope_head_dim]`` (already rotated), ``latent [T, kv_lora_rank]`` (already
    normed), ``k_pe [T, qk_rope_head_dim]`` (already rotated), ``w_kc [H, qk_nope_head_dim,
    kv_lora_rank]``, ``w_vc [H, v_head_dim, kv_lora_rank]``, cache as :meth:`kv_cache_shape`;
    outputs ``[T, H, v_head_dim]``. With ``strided_inputs`` (since plugin API 1.1) an
    implementation takes ``q_nope``, ``q_pe`` and ``k_pe`` as strided views of the q and
    ``kv_a`` projections (last dim contiguous, other strides arbitrary); without it the layer
    passes dense copies, as plugin API 1.0 did. Hooks (``prepare``, graph hooks, ``graph_safe``) mean
    what they mean on :class:`~heteroserve.core.kernels.attention.AttentionBackend`. Methods
    do not synchronise with the host. Shape mismatches raise ``ValueError`` naming the tensor.
    """

    kv_layout: KVLayout = KVLayout.LATENT
    #: cache tensors per layer: MLA keeps one (the KV pool allocates no V cache)
    caches_per_layer: int = 1
    page_sizes: tuple[int, ...] | None = None
    graph_safe: bool = False
    #: takes strided q_nope / q_pe / k_pe views (see the class docstring)
    strided_inputs: bool = False

    def __init__(self, config: MLAConfig) -> None:
        self.config = config

    def kv_cache_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of one layer's latent cache for ``num_pages`` pages."""
        return (num_pages, self.config.page_size, self.config.latent_dim)

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per forward step before any layer."""

    def warm_up(self, max_context_len: int, chunk_size: int) -> str | None:
        """See :meth:`AttentionBackend.warm_up` (since plugin API 1.3)."""
        return None

    def begin_graph_capture(self, meta: AttentionMetadata) -> None:
        """See :meth:`AttentionBackend.begin_graph_capture`."""

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """See :meth:`AttentionBackend.before_graph_replay`."""

    @abstractmethod
    def write_kv(self, latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Store ``[latent | k_pe]`` of the new tokens at ``meta.out_cache_loc``; no other slot
        changes."""

    @abstractmethod
    def extend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        """Causal MLA of each new token over its sequence's cached prefix and the new tokens
        up to itself (already written). ``meta.mode`` is EXTEND."""

    @abstractmethod
    def decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence over its whole cache. ``meta.mode`` is DECODE."""

    def forward_prologue(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         latent: torch.Tensor, k_pe: torch.Tensor, prologue: MLAPrologue,
                         cache: torch.Tensor, w_kc: torch.Tensor, w_vc: torch.Tensor,
                         layer: MLALayer, meta: AttentionMetadata) -> torch.Tensor | None:
        """Optional (plugin API 1.8): :meth:`forward` of un-normed ``latent`` and un-rotated
        ``q_pe`` / ``k_pe`` (strided views as :attr:`strided_inputs` allows), applying
        ``prologue`` first: the cache then holds the normed latent and rotated ``k_pe``
        rows, and attention uses the rotated ``q_pe``. The inputs are not modified. Returns
        None (the default) where this implementation does not fold the prologue into this
        call (any mode or batch it chooses); the layer then runs the norm and rotary ops
        and calls :meth:`forward`."""
        return None

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                k_pe: torch.Tensor, cache: torch.Tensor, w_kc: torch.Tensor,
                w_vc: torch.Tensor, layer: MLALayer, meta: AttentionMetadata) -> torch.Tensor:
        """Write the new tokens' latent rows, then attend according to ``meta.mode``."""
        self.write_kv(latent, k_pe, cache, meta)
        if meta.mode is ForwardMode.DECODE:
            return self.decode(q_nope, q_pe, cache, w_kc, w_vc, layer, meta)
        return self.extend(q_nope, q_pe, cache, w_kc, w_vc, layer, meta)
