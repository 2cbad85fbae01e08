"""Paged attention on Intel GPUs through IPEX's ``ipex.llm.modules.PagedAttention``.

KV cache: HND ``[num_pages, kv_heads, page_size, head_size]``, the layout IPEX's class
documentation gives for its paged kernels ("(num_blocks, num_heads, block_size, head_size)").
IPEX's ``reshape_and_cache`` documents the other (NHD) layout in the same page, so the KV write
does not rely on it: new tokens are stored with one torch ``index_put_`` (exact, any device).

Calls made (IPEX's argument order):

- Extend: ``PagedAttention.flash_attn_varlen_func(output [T, Hq, D], query [T, Hq, D],
  key_cache, value_cache, cu_seqlens_q int32 [B+1], cu_seqlens_kv int32 [B+1] (cumulative
  KV lengths), max_seqlen_q, max_seqlen_kv, scale, is_cusal=True, block_tables int32
  [B, max_pages], k_scale=1.0, v_scale=1.0, alibi_slopes=None)``; causal with the query block
  aligned to the end of each sequence's KV.
- Decode: ``PagedAttention.single_query_cached_kv_attention(output [B, Hq, D], query,
  key_cache, value_cache, head_mapping int32 [Hq] (query head -> KV head), scale,
  block_tables, context_lens int32 [B], block_size, max_context_len, k_scale=1.0,
  v_scale=1.0, alibi_slopes=None)``.

fp16/bf16; no sliding window or logit soft-cap (the spec's ``supports`` says so).
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata,
)
from heteroserve.core.platform import KVLayout


class IpexPagedAttention(AttentionBackend):
    """IPEX paged attention (see the module docstring for the exact calls)."""

    kv_layout = KVLayout.HND
    page_sizes = None

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        from intel_extension_for_pytorch.llm.modules import PagedAttention  # noqa: PLC0415

        self._paged = PagedAttention
        group = config.num_q_heads // config.num_kv_heads
        self._head_mapping = (torch.arange(config.num_q_heads, device=config.device)
                              // group).to(torch.int32)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        loc = meta.out_cache_loc.to(torch.int64)
        page, offset = loc // meta.page_size, loc % meta.page_size
        k_cache[page, :, offset, :] = k.to(k_cache.dtype)
        v_cache[page, :, offset, :] = v.to(v_cache.dtype)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        cu_kv = torch.zeros(meta.batch_size + 1, dtype=torch.int32, device=q.device)
        torch.cumsum(meta.seq_lens, 0, out=cu_kv[1:])
        self._paged.flash_attn_varlen_func(
            out, q, k_cache, v_cache, meta.qo_indptr, cu_kv,
            max(meta.extend_lens_cpu, default=0), meta.max_seq_len, layer.scale, True,
            meta.block_table, 1.0, 1.0, None)
        return out

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        self._paged.single_query_cached_kv_attention(
            out, q, k_cache, v_cache, self._head_mapping, layer.scale, meta.block_table,
            meta.seq_lens.to(torch.int32), meta.page_size, meta.max_seq_len, 1.0, 1.0, None)
        return out
