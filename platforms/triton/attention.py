"""``TritonAttention``: the paged-attention backend built from this package's Triton kernels
(contract: :mod:`heteroserve.core.kernels.attention`)."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata, AttentionPrologue,
    ForwardMode,
)
from heteroserve.core.platform import KVLayout
from heteroserve.platforms.triton.attention_decode import choose_num_splits, decode_attention
from heteroserve.platforms.triton.attention_extend import extend_attention
from heteroserve.platforms.triton.attention_prologue import check_prologue
from heteroserve.platforms.triton.kv_write import check_nhd_cache, write_kv

MAX_HEAD_SIZE = 256
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class TritonAttention(AttentionBackend):
    """Paged attention in Triton over contiguous NHD caches, any page size.

    Supports GQA/MQA, causal extend on top of a cached prefix, sliding windows (Hugging Face
    convention), logit soft-capping, head sizes 16..256 (non powers of two are padded in
    registers, e.g. 96 -> 128) and bf16/fp16/fp32. ``write_kv`` is one scatter kernel;
    ``extend`` one flash-attention kernel; ``decode`` two kernels (split-KV, then merge);
    ``forward`` in decode mode stores the new K/V inside the split kernel.
    Everything reads only device tensors of the metadata plus host lengths that size grids,
    so decode is safe to capture in a device graph for a fixed batch size. Raises
    ``ValueError`` on a config it cannot serve or tensors that disagree with it.
    """

    kv_layout = KVLayout.NHD
    page_sizes = None
    #: not part of the AttentionBackend contract: decode reads only device metadata and its
    #: grid depends on the batch size alone, so it may be captured in a device graph
    graph_safe = True

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        if config.num_q_heads % config.num_kv_heads:
            raise ValueError(f"TritonAttention: {config.num_q_heads} query heads are not a "
                             f"multiple of {config.num_kv_heads} KV heads")
        if not 16 <= config.head_size <= MAX_HEAD_SIZE:
            raise ValueError(f"TritonAttention: head size {config.head_size} not in 16..256")
        if config.dtype not in DTYPES:
            raise ValueError(f"TritonAttention: dtype {config.dtype} not supported")
        self._meta_key: int | None = None
        self._max_extend = 0

    def prepare(self, meta: AttentionMetadata) -> None:
        """Cache the step's largest extend length (host value) for the extend grid."""
        self._remember(meta)

    def _remember(self, meta: AttentionMetadata) -> int:
        if self._meta_key != id(meta):
            self._meta_key = id(meta)
            self._max_extend = max(meta.extend_lens_cpu, default=0)
        return self._max_extend

    def _check(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata) -> None:
        c = self.config
        if q.dim() != 3 or tuple(q.shape[1:]) != (c.num_q_heads, c.head_size):
            raise ValueError(f"attention: q must be [T, {c.num_q_heads}, {c.head_size}], "
                             f"got {tuple(q.shape)}")
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"attention: q has {q.shape[0]} rows but the metadata has "
                             f"{meta.num_tokens} new tokens")
        if q.stride(2) != 1:
            raise ValueError("attention: q's last dimension must be contiguous")
        if meta.page_size != c.page_size:
            raise ValueError(f"attention: metadata page size {meta.page_size} != configured "
                             f"{c.page_size}")
        for cache in (k_cache, v_cache):
            check_nhd_cache(cache, c.page_size, c.num_kv_heads, c.head_size)

    def _check_new_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        c = self.config
        if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != (c.num_kv_heads,
                                                                       c.head_size):
            raise ValueError(f"write_kv: k/v must be [T, {c.num_kv_heads}, {c.head_size}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Scatter ``k``/``v`` ``[T, Hk, D]`` to slots ``meta.out_cache_loc``."""
        c = self.config
        self._check_new_kv(k, v)
        for cache in (k_cache, v_cache):
            check_nhd_cache(cache, c.page_size, c.num_kv_heads, c.head_size)
        write_kv(k, v, k_cache, v_cache, meta.out_cache_loc)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, ``[T, Hq, D]``."""
        self._check(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return extend_attention(q, k_cache, v_cache, out, layer, meta, self._remember(meta),
                                self.config.num_kv_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: AttentionLayer,
                meta: AttentionMetadata) -> torch.Tensor:
        """``write_kv`` then ``extend``/``decode``; a decode step does both in one launch."""
        if meta.mode is not ForwardMode.DECODE:
            return super().forward(q, k, v, k_cache, v_cache, layer, meta)
        self._check_new_kv(k, v)
        k = k if k.stride(2) == 1 else k.contiguous()
        v = v if v.stride(2) == 1 else v.contiguous()
        return self.decode(q, k_cache, v_cache, layer, meta, new_kv=(k, v))

    def forward_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, layer: AttentionLayer,
                         meta: AttentionMetadata,
                         prologue: AttentionPrologue) -> torch.Tensor | None:
        """Decode over caches of the model dtype: the split kernel norms and rotates each
        query head as it loads it and the new key before it stores it
        (:mod:`.attention_prologue`), so a layer has no qk-norm / rotary launch. None for
        extends and fp8 caches (the layer runs the ops)."""
        if meta.mode is not ForwardMode.DECODE or self.config.kv_cache_dtype is not None:
            return None
        self._check_new_kv(k, v)
        check_prologue(prologue, q.shape[0], self.config.head_size)
        k = k if k.stride(2) == 1 else k.contiguous()
        v = v if v.stride(2) == 1 else v.contiguous()
        return self.decode(q, k_cache, v_cache, layer, meta, new_kv=(k, v), prologue=prologue)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata,
               new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
               prologue: AttentionPrologue | None = None) -> torch.Tensor:
        """One query per sequence over its whole cache, ``[B, Hq, D]``; with ``new_kv`` the
        kernel first stores this step's ``(k, v)`` at ``meta.out_cache_loc``, with
        ``prologue`` (and ``new_kv``) normed and rotated as it loads them."""
        self._check(q, k_cache, v_cache, meta)
        if q.shape[0] != meta.batch_size:
            raise ValueError(f"decode: expected one query per sequence ({meta.batch_size}), "
                             f"got {q.shape[0]}")
        c = self.config
        splits = choose_num_splits(meta.batch_size, c.num_kv_heads, c.max_context_len, q.device)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return decode_attention(q, k_cache, v_cache, out, layer, meta, c.num_kv_heads, splits,
                                new_kv=new_kv, prologue=prologue)
