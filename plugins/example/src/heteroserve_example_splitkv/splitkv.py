"""Split-KV decode attention: each sequence's KV is cut into fixed-size chunks, each chunk
yields a partial softmax (its max, its sum of exponentials and its weighted values), and the
chunks are merged with the log-sum-exp rule. On a GPU this is what spreads one long
sequence over many cores; here it shows a vendor how to add a second implementation of an op.

Write and extend reuse the built-in torch-native backend; only ``decode`` differs.
"""

from __future__ import annotations

import torch

from heteroserve.plugin_api import AttentionLayer, AttentionMetadata, TorchNativeAttention

CHUNK = 32


class SplitKVAttention(TorchNativeAttention):
    """Torch-native paged attention whose decode path uses split-KV chunks of ``CHUNK`` keys.

    Same contract as :class:`~heteroserve.core.kernels.attention.AttentionBackend` (NHD
    layout, any page size, GQA, sliding window, logit cap).
    """

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.config
        group = cfg.num_q_heads // cfg.num_kv_heads
        page = meta.page_size
        k_flat = k_cache.reshape(-1, cfg.num_kv_heads, cfg.head_size)
        v_flat = v_cache.reshape(-1, cfg.num_kv_heads, cfg.head_size)
        out = torch.empty_like(q)
        indptr = meta.kv_page_indptr.tolist()
        for b, seq_len in enumerate(meta.seq_lens_cpu):
            pages = meta.kv_page_indices[indptr[b]:indptr[b + 1]].to(torch.int64)
            slots = (pages[:, None] * page + torch.arange(page, device=pages.device)).reshape(-1)
            slots = slots[:seq_len]
            out[b] = self._split_kv_one(q[b], k_flat[slots], v_flat[slots], group, layer)
        return out

    @staticmethod
    def _split_kv_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int,
                      layer: AttentionLayer) -> torch.Tensor:
        """``q [Hq, D]``, ``k/v [L, Hkv, D]`` -> ``[Hq, D]`` for the query at position L-1."""
        length = k.shape[0]
        n_chunks = -(-length // CHUNK)
        pad = n_chunks * CHUNK - length
        kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad))
        vf = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, pad))
        kf = kf.repeat_interleave(group, dim=1).view(n_chunks, CHUNK, -1, k.shape[-1])
        vf = vf.repeat_interleave(group, dim=1).view(n_chunks, CHUNK, -1, v.shape[-1])
        scores = torch.einsum("hd,cthd->cht", q.float(), kf) * layer.scale
        if layer.logit_cap:
            scores = layer.logit_cap * torch.tanh(scores / layer.logit_cap)
        pos = torch.arange(n_chunks * CHUNK, device=q.device).view(n_chunks, 1, CHUNK)
        valid = pos < length
        if layer.sliding_window:
            valid = valid & (pos > length - 1 - layer.sliding_window)
        scores = scores.masked_fill(~valid, float("-inf"))
        chunk_max = scores.amax(dim=-1, keepdim=True)  # [C, H, 1]
        safe_max = torch.where(torch.isfinite(chunk_max), chunk_max, torch.zeros_like(chunk_max))
        weights = torch.exp(scores - safe_max)
        chunk_sum = weights.sum(dim=-1, keepdim=True)
        chunk_out = torch.einsum("cht,cthd->chd", weights, vf)
        global_max = chunk_max.amax(dim=0, keepdim=True)  # finite: the query sees itself
        rescale = torch.exp(chunk_max - global_max)  # 0 for chunks with no visible key
        total = (chunk_sum * rescale).sum(dim=0)
        merged = (chunk_out * rescale).sum(dim=0) / total
        return merged.to(q.dtype)
