"""Paged attention on Ascend through ``torch_npu.npu_fused_infer_attention_score`` (FIA).

KV cache: each layer's K and V are NHD ``[num_pages, 128, kv_heads, head_size]`` tensors. FIA's
paged mode reads them through the zero-copy BSH block view ``[num_pages, 128, kv_heads *
head_size]`` together with ``block_table`` (int32 ``[B, max_pages]``) and ``block_size=128``.

Calls made (argument names as torch_npu documents them):

- KV write: ``torch_npu._npu_reshape_and_cache(key=k [T, Hk, D], value=v [T, Hk, D],
  key_cache=K [P, 128, Hk, D], value_cache=V, slot_indices=int32 [T])`` (ATB ReshapeAndCache,
  ND caches; writes slot ``s`` to page ``s // 128``, row ``s % 128``).
- Extend (prefill, chunked prefill over a cached prefix): ``npu_fused_infer_attention_score(
  query [T, Hq, D], key=K_bsh, value=V_bsh, atten_mask=bool [2048, 2048] (True above the
  diagonal), block_table, input_layout="TND", block_size=128, actual_seq_lengths=<cumulative
  query ends, host ints>, actual_seq_lengths_kv=<per-sequence KV lengths, host ints>,
  num_key_value_heads=Hk, num_heads=Hq, scale=layer.scale, sparse_mode=3)``. ``sparse_mode=3``
  is right-down causal: query ``i`` of a sequence with ``q`` new tokens and ``s`` KV tokens
  sees keys ``j <= s - q + i``, which is exactly "prefix plus new tokens up to itself".
- Decode: the same operator with ``query [B, 1, Hq * D]``, ``input_layout="BSH"``,
  ``block_table``, ``block_size=128``, ``actual_seq_lengths_kv=<seq lens>`` and no mask
  (a single query row needs none).

Both calls return ``(attention_out, softmax_lse)``; only the first is used. Head sizes up to
256, fp16/bf16 only; sliding windows and logit soft-capping are not wired (the spec's
``supports`` says so and the engine falls back).
"""

from __future__ import annotations

from itertools import accumulate

import torch

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata,
)
from heteroserve.core.platform import KVLayout
from heteroserve.platforms.npu.platform import NPU_PAGE_SIZE, _torch_npu

#: FIA's sparse_mode 2/3/4 take this fixed-size "compressed" causal mask.
FIA_MASK_SIZE = 2048


class NpuFusedInferAttention(AttentionBackend):
    """Ascend paged attention (see the module docstring for the exact calls)."""

    kv_layout = KVLayout.NHD
    page_sizes = (NPU_PAGE_SIZE,)

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        if config.page_size != NPU_PAGE_SIZE:
            raise ValueError(f"torch_npu paged attention needs page_size {NPU_PAGE_SIZE}, "
                             f"got {config.page_size}")
        if config.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"torch_npu paged attention takes fp16/bf16, got {config.dtype}")
        self._npu = _torch_npu()
        self._mask = torch.triu(torch.ones(FIA_MASK_SIZE, FIA_MASK_SIZE, dtype=torch.bool,
                                           device=config.device), diagonal=1)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        self._npu._npu_reshape_and_cache(
            key=k, value=v, key_cache=k_cache, value_cache=v_cache,
            slot_indices=meta.out_cache_loc.to(torch.int32))

    def _bsh(self, cache: torch.Tensor) -> torch.Tensor:
        c = self.config
        return cache.view(cache.shape[0], c.page_size, c.num_kv_heads * c.head_size)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        c = self.config
        out, _ = self._npu.npu_fused_infer_attention_score(
            q, self._bsh(k_cache), self._bsh(v_cache),
            atten_mask=self._mask, block_table=meta.block_table, input_layout="TND",
            block_size=c.page_size, actual_seq_lengths=list(accumulate(meta.extend_lens_cpu)),
            actual_seq_lengths_kv=list(meta.seq_lens_cpu), num_key_value_heads=c.num_kv_heads,
            num_heads=c.num_q_heads, scale=layer.scale, sparse_mode=3)
        return out.view(q.shape)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        c = self.config
        batch = q.shape[0]
        out, _ = self._npu.npu_fused_infer_attention_score(
            q.reshape(batch, 1, c.num_q_heads * c.head_size),
            self._bsh(k_cache), self._bsh(v_cache),
            block_table=meta.block_table, input_layout="BSH", block_size=c.page_size,
            actual_seq_lengths_kv=list(meta.seq_lens_cpu), num_key_value_heads=c.num_kv_heads,
            num_heads=c.num_q_heads, scale=layer.scale)
        return out.view(q.shape)
