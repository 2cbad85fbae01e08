"""Paged attention on AMD GPUs through aiter.

KV cache: NHD ``[num_pages, page_size, kv_heads, head_size]`` (vLLM's "flash" layout) with
pages of 16 (preferred), 1 or 32 tokens: the page sizes aiter's ragged decode kernel is tested
with, all dividing its 256-token partition. aiter's other decode kernels (``pa_fwd_asm``,
``paged_attention_rocm``) want the x-packed K cache ``[num_pages, kv_heads, head_size / x,
page_size, x]`` (``x = 16 / itemsize``) and a transposed V cache, which ``KVLayout`` cannot
express; ``paged_attention_ragged`` reads NHD directly and takes flashinfer's CSR page table,
which is exactly :class:`AttentionMetadata`.

Calls made (aiter's argument order):

- KV write: ``aiter.reshape_and_cache_flash(key [T, Hk, D], value, key_cache, value_cache,
  slot_mapping int64 [T], kv_cache_dtype="auto", k_scale fp32 [1], v_scale fp32 [1])``.
- Decode: ``aiter.paged_attention_ragged(out [B, Hq, D], workspace_buffer uint8, query
  [B, Hq, D], key_cache, value_cache, scale, kv_indptr int32 [B+1], kv_page_indices int32,
  kv_last_page_lens int32 [B], block_size, max_num_partitions, alibi_slopes=None,
  kv_cache_dtype="auto", kv_cache_layout="NHD", logits_soft_cap, k_scale, v_scale,
  fp8_out_scale=None, partition_size=256)``. The workspace holds the split-KV partials:
  ``B*Hq*parts*D`` elements of the output dtype plus ``2*B*Hq*parts`` fp32 (exp sums, maxima).
- Extend: each sequence's whole KV (prefix and new tokens, already written) is gathered from the
  pages into contiguous ``[sum(seq_lens), Hk, D]`` and ``aiter.flash_attn_varlen_func(q, k, v,
  cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=scale,
  logits_soft_cap=cap, causal=True, window_size=(left, right, 0))`` runs; its causal mask is
  aligned bottom-right, so new token ``i`` sees the prefix and new tokens up to itself, and
  ``window_size=(w - 1, 0, 0)`` is Hugging Face's sliding window ``w``.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata,
)
from heteroserve.core.platform import KVLayout

AITER_PAGE_SIZES = (16, 1, 32)
AITER_HEAD_SIZES = (64, 128)
PARTITION_SIZE = 256


def gather_kv_slots(meta: AttentionMetadata) -> torch.Tensor:
    """int64 ``[sum(seq_lens)]``: the cache slot of every KV position of every sequence, in
    sequence order (position ``p`` of sequence ``b`` lives in page ``p // page_size`` of its
    page list, row ``p % page_size``). No host synchronisation."""
    device = meta.kv_page_indices.device
    total = sum(meta.seq_lens_cpu)
    lens = meta.seq_lens.to(torch.int64)
    seq_ids = torch.repeat_interleave(torch.arange(meta.batch_size, device=device), lens,
                                      output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=device) - starts[seq_ids]
    page_slot = meta.kv_page_indptr.to(torch.int64)[seq_ids] + pos // meta.page_size
    pages = meta.kv_page_indices.to(torch.int64)[page_slot]
    return pages * meta.page_size + pos % meta.page_size


class AiterPagedAttention(AttentionBackend):
    """aiter paged attention (see the module docstring for the exact calls)."""

    kv_layout = KVLayout.NHD
    page_sizes = AITER_PAGE_SIZES

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        if config.page_size not in AITER_PAGE_SIZES:
            raise ValueError(f"aiter paged attention takes page sizes {AITER_PAGE_SIZES}, "
                             f"got {config.page_size}")
        import aiter  # noqa: PLC0415

        self._aiter = aiter
        self._unit_scale = torch.ones(1, dtype=torch.float32, device=config.device)
        self._workspace = torch.empty(0, dtype=torch.uint8, device=config.device)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        self._aiter.reshape_and_cache_flash(
            k, v, k_cache, v_cache, meta.out_cache_loc.to(torch.int64), "auto",
            self._unit_scale, self._unit_scale)

    def _workspace_for(self, batch: int, parts: int, q: torch.Tensor) -> torch.Tensor:
        heads, head_size = self.config.num_q_heads, self.config.head_size
        need = batch * heads * parts * (head_size * q.element_size() + 2 * 4)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8, device=q.device)
        return self._workspace[:need]

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        parts = max(1, -(-meta.max_seq_len // PARTITION_SIZE))
        out = torch.empty_like(q)
        self._aiter.paged_attention_ragged(
            out, self._workspace_for(q.shape[0], parts, q), q, k_cache, v_cache, layer.scale,
            meta.kv_page_indptr, meta.kv_page_indices, meta.kv_last_page_len,
            meta.page_size, parts, None, "auto", "NHD", float(layer.logit_cap or 0.0),
            self._unit_scale, self._unit_scale, None, PARTITION_SIZE)
        return out

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        c = self.config
        slots = gather_kv_slots(meta)
        k = k_cache.view(-1, c.num_kv_heads, c.head_size).index_select(0, slots)
        v = v_cache.view(-1, c.num_kv_heads, c.head_size).index_select(0, slots)
        cu_k = torch.zeros(meta.batch_size + 1, dtype=torch.int32, device=q.device)
        torch.cumsum(meta.seq_lens, 0, out=cu_k[1:])
        window = (layer.sliding_window - 1, 0, 0) if layer.sliding_window else (-1, -1, 0)
        return self._aiter.flash_attn_varlen_func(
            q, k, v, meta.qo_indptr, cu_k, max(meta.extend_lens_cpu, default=0),
            meta.max_seq_len, softmax_scale=layer.scale,
            logits_soft_cap=float(layer.logit_cap or 0.0), causal=True, window_size=window)
