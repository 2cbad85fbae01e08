"""The paged-attention contract shared by every attention implementation.

KV cache: per layer, one K and one V tensor in the backend's :class:`KVLayout`, holding
``num_pages`` pages of ``page_size`` token slots. A token's *slot* is
``page_index * page_size + offset_in_page``. Page 0 is never handed to a request (the KV pool
reserves it), so padded page tables may point at it harmlessly.

One forward step covers a batch of sequences in a single *mode*: ``extend`` (prefill or
chunked prefill on top of an already cached prefix; ``extend_len >= 1`` new tokens each) or
``decode`` (exactly one new token each). The engine first calls :meth:`AttentionBackend.prepare`
once per step with the :class:`AttentionMetadata`, then per layer :meth:`write_kv` for the new
tokens' K/V followed by :meth:`extend` or :meth:`decode`, which read everything (prefix and
new tokens) from the cache.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch

from heteroserve.core.platform import KVLayout


class ForwardMode(str, enum.Enum):
    EXTEND = "extend"
    DECODE = "decode"


@dataclass(frozen=True)
class AttentionConfig:
    """Model-wide attention facts, fixed when the engine is built.

    Invariants: ``num_q_heads % num_kv_heads == 0``; ``head_size`` in 64..256 for the
    built-in kernels; ``page_size >= 1``.

    ``kv_cache_dtype`` (None: ``dtype``) may be an fp8 dtype (the platform's flavour, e.g.
    ``float8_e4m3fn``) for backends whose spec lists ``fp8_e4m3`` in ``kv_cache_dtypes``:
    ``write_kv`` then stores ``k``/``v`` rounded to it, saturating at its largest finite
    value, and attention reads the cached values converted back, unscaled (per-layer K/V
    scales are applied by the calling layer, ``PagedAttention``).
    """

    num_q_heads: int
    num_kv_heads: int
    head_size: int
    page_size: int
    dtype: torch.dtype
    device: torch.device
    max_batch_size: int = 256
    max_context_len: int = 8192
    kv_cache_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV caches' dtype: ``kv_cache_dtype``, or ``dtype`` when None."""
        return self.kv_cache_dtype or self.dtype


@dataclass(frozen=True)
class AttentionLayer:
    """Per-layer parameters.

    ``scale`` multiplies ``q . k`` (usually ``head_size ** -0.5``). ``sliding_window``: when set
    to ``w``, a query at position ``p`` attends only keys at positions ``p - w < k_pos <= p``
    (Hugging Face's convention; flashinfer's ``window_left`` is ``w - 1``). ``logit_cap``: when
    set to ``c``, scores become ``c * tanh(score / c)`` after scaling, before the softmax.
    """

    layer_id: int
    scale: float
    sliding_window: int | None = None
    logit_cap: float | None = None


@dataclass(frozen=True)
class AttentionPrologue:
    """The ops between a decoder's qkv projection and attention, for a backend to fold in
    (:meth:`AttentionBackend.forward_prologue`): with norm weights, a per-head RMSNorm of q
    and k as ``QKNormRotaryOp`` defines it (fp32 math, rounded to the dtype), then in any case
    ``RotaryOp(positions, q, k, cos_sin_cache, is_neox)``. ``positions`` int64 ``[T]``;
    ``cos_sin_cache`` fp32 ``[max_position, R]`` (``R`` even, ``R <= head_size``);
    ``q_norm_weight`` / ``k_norm_weight`` ``[head_size]`` effective weights, both set or
    both None, sharing ``eps``."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    eps: float = 0.0

    def __post_init__(self) -> None:
        if (self.q_norm_weight is None) != (self.k_norm_weight is None):
            raise ValueError("AttentionPrologue: q and k norm weights are both set or both None")

    @property
    def has_norm(self) -> bool:
        """Whether q and k are RMS-normed per head before the rotation."""
        return self.q_norm_weight is not None


@dataclass
class AttentionMetadata:
    """One step's batch, in flashinfer's CSR page format plus derived views.

    Device tensors (on the engine's device):
      - ``qo_indptr`` int32 ``[B+1]``: new tokens of sequence ``b`` are rows
        ``qo_indptr[b]:qo_indptr[b+1]`` of q/k/v (decode: ``arange(B+1)``).
      - ``seq_lens`` int32 ``[B]``: KV length after this step (prefix + new tokens).
      - ``prefix_lens`` int32 ``[B]``: KV length already cached before this step.
      - ``kv_page_indptr`` int32 ``[B+1]`` and ``kv_page_indices`` int32 ``[P]``: sequence
        ``b``'s pages, in order, are ``kv_page_indices[kv_page_indptr[b]:kv_page_indptr[b+1]]``
        and cover exactly ``seq_lens[b]`` slots.
      - ``kv_last_page_len`` int32 ``[B]``: slots used in each sequence's last page (1..page_size).
      - ``out_cache_loc`` int64 ``[T]``: slot for each new token, in row order.
    Host values: ``seq_lens_cpu``, ``prefix_lens_cpu`` (lists of int), ``page_size``.

    Invariants: ``T == qo_indptr[-1]``; new token ``i`` of sequence ``b`` has position
    ``prefix_lens[b] + i`` and its slot is that position's slot in ``b``'s pages.
    """

    mode: ForwardMode
    page_size: int
    qo_indptr: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    kv_page_indptr: torch.Tensor
    kv_page_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    out_cache_loc: torch.Tensor
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.out_cache_loc.shape[0])

    @property
    def extend_lens_cpu(self) -> list[int]:
        return [s - p for s, p in zip(self.seq_lens_cpu, self.prefix_lens_cpu)]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @cached_property
    def block_table(self) -> torch.Tensor:
        """int32 ``[B, max_pages]``: row ``b`` lists ``b``'s pages, padded with 0 (the reserved
        page). The layout torch_npu, aiter and vLLM-style kernels take."""
        counts = [-(-s // self.page_size) for s in self.seq_lens_cpu]
        width = max(counts, default=0)
        table = torch.zeros((self.batch_size, max(width, 1)), dtype=torch.int32,
                            device=self.kv_page_indices.device)
        if width:
            rows = torch.repeat_interleave(
                torch.arange(self.batch_size, device=table.device),
                torch.tensor(counts, device=table.device))
            starts = self.kv_page_indptr[:-1].to(torch.int64)
            cols = torch.arange(rows.numel(), device=table.device) - starts[rows]
            table[rows, cols] = self.kv_page_indices[: rows.numel()]
        return table


class AttentionBackend(ABC):
    """A paged-attention implementation, built once per engine from an :class:`AttentionConfig`.

    Class attributes declare what it needs: ``kv_layout`` (the pool allocates caches in it)
    and ``page_sizes`` (``None``: any). Instances may keep per-step state set by
    :meth:`prepare` (flashinfer plans, split-KV workspaces); that state is valid until the
    next ``prepare``.

    Tensors: q ``[T, num_q_heads, head_size]``, k/v ``[T, num_kv_heads, head_size]``, output
    ``[T, num_q_heads, head_size]``, all in ``config.dtype``; caches as
    :meth:`kv_cache_shape` says, in ``config.cache_dtype``. Query head ``h`` reads KV head ``h // (num_q_heads //
    num_kv_heads)`` (GQA). Attention is causal within each sequence. Methods do not
    synchronise with the host.
    """

    kv_layout: KVLayout = KVLayout.NHD
    #: cache tensors per layer (K and V)
    caches_per_layer: int = 2
    page_sizes: tuple[int, ...] | None = None
    #: whether a decode step may be captured in a device graph and replayed for later steps
    #: of the same batch size with new metadata values: the captured work reads metadata only
    #: from the device tensors, or what it planned is refreshed in :meth:`before_graph_replay`
    graph_safe: bool = False

    def __init__(self, config: AttentionConfig) -> None:
        self.config = config

    def kv_cache_shape(self, num_pages: int) -> tuple[int, ...]:
        """Shape of one layer's K (and, separately, V) cache for ``num_pages`` pages."""
        c = self.config
        if self.kv_layout is KVLayout.NHD:
            return (num_pages, c.page_size, c.num_kv_heads, c.head_size)
        return (num_pages, c.num_kv_heads, c.page_size, c.head_size)

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per forward step before any layer; plan kernels for ``meta``."""

    def warm_up(self, max_context_len: int, chunk_size: int) -> str | None:
        """Called once at start-up, after the KV pool is allocated and before any step:
        build what the backend makes per new shape (kernel plans, compiled variants) for the
        extends a prompt of up to ``max_context_len`` tokens prefilled in chunks of
        ``chunk_size`` will run, so no request pays for it. May allocate temporary device
        memory and must free it; must not touch the KV pool. Returns one line for the
        start-up block saying what it built, or None (default: nothing to build). Since
        plugin API 1.3."""
        return None

    def begin_graph_capture(self, meta: AttentionMetadata) -> None:
        """Called before decode steps over the static ``meta`` (its tensors are a graph's
        buffers, refilled before every replay) are warmed up and captured. Default: nothing."""

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """Called before each replay of a graph captured over ``meta``, once its buffers and
        host lengths hold this step's values (host planning that cannot be captured goes
        here). Default: nothing."""

    @abstractmethod
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store new tokens' K/V at ``meta.out_cache_loc``; no other slot changes."""

    @abstractmethod
    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each new token over its sequence's cached prefix and the new
        tokens up to itself (their K/V already written). ``meta.mode`` is EXTEND."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence (``T == B``) over the sequence's whole cache (its own K/V
        included). ``meta.mode`` is DECODE."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: AttentionLayer,
                meta: AttentionMetadata) -> torch.Tensor:
        """Write K/V, then attend according to ``meta.mode``."""
        self.write_kv(k, v, k_cache, v_cache, meta)
        if meta.mode is ForwardMode.DECODE:
            return self.decode(q, k_cache, v_cache, layer, meta)
        return self.extend(q, k_cache, v_cache, layer, meta)

    def forward_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, layer: AttentionLayer,
                         meta: AttentionMetadata,
                         prologue: AttentionPrologue) -> torch.Tensor | None:
        """Optional (plugin API 1.9): :meth:`forward` of un-normed, un-rotated ``q`` / ``k``
        (strided views of one projection output allowed, last dim contiguous), applying
        ``prologue`` first: the K cache then holds the normed, rotated new keys and
        attention uses the normed, rotated queries. The inputs are not modified. Returns
        None (the default) where this implementation does not fold the prologue into this
        call (any mode, batch or cache dtype it chooses); the layer then runs the qk-norm /
        rotary ops and calls :meth:`forward`."""
        return None
