"""Torch-native paged attention (contract: ``core/kernels/attention.py``).

Runs on any torch device. ``extend`` computes every sequence's slot table at once, then
gathers K/V and attends sequence by sequence, chunking long query runs so the score matrix
stays bounded. ``decode`` is fully vectorised over a padded batch. Scores,
softmax and the weighted sum are fp32; outputs are in q's dtype. No host synchronisation:
only the host-side lengths in the metadata drive the Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionLayer, AttentionMetadata,
)
from heteroserve.core.platform import KVLayout

#: Upper bound on fp32 score elements materialised at once per sequence chunk.
_SCORE_BUDGET = 1 << 24


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the cache dtype; fp8 saturates at its largest finite value."""
    if dtype.itemsize == 1 and dtype.is_floating_point:
        fmax = float(torch.finfo(dtype).max)
        return x.to(torch.float32).clamp(-fmax, fmax).to(dtype)
    return x.to(dtype)


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_len: torch.Tensor | int,
          window: int | None) -> torch.Tensor:
    """Boolean "may attend" mask, broadcast of ``q_pos [..., Q, 1]`` and ``k_pos [..., 1, K]``:
    causal, inside the sequence (``k_pos < k_len``) and, with ``window = w``,
    ``k_pos > q_pos - w``."""
    allowed = (k_pos <= q_pos) & (k_pos < k_len)
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            layer: AttentionLayer) -> torch.Tensor:
    """``q [N, Hk, G, Q, D]``, ``k/v [N, Hk, K, D]``, ``allowed`` broadcastable to
    ``[N, 1, 1, Q, K]`` -> fp32 ``[N, Hk, G, Q, D]``. Every query row must allow >= 1 key."""
    qf, kf, vf = q.to(torch.float32), k.to(torch.float32), v.to(torch.float32)
    if layer.logit_cap is None:
        n, hk, g, nq, d = qf.shape
        out = F.scaled_dot_product_attention(
            qf.reshape(n, hk, g * nq, d), kf, vf,
            attn_mask=allowed.expand(n, 1, g, nq, -1).reshape(n, 1, g * nq, -1),
            scale=layer.scale)
        return out.view(n, hk, g, nq, d)
    scores = torch.matmul(qf, kf.unsqueeze(2).transpose(-1, -2)) * layer.scale
    cap = float(layer.logit_cap)
    scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf.unsqueeze(2))


class TorchNativeAttention(AttentionBackend):
    """Paged attention with plain torch ops, NHD cache layout, any page size.

    Supports GQA, sliding windows (Hugging Face convention), logit soft-capping, any head
    size, q dtypes bf16/fp16/fp32 and cache dtypes bf16/fp16/fp32 or fp8 (``fp8_e4m3``). Raises ``ValueError`` when tensor shapes do not
    match the config or the metadata.
    """

    kv_layout = KVLayout.NHD
    page_sizes = None

    # -- layout-specific indexing (overridden by the HND variant) --------------------------
    def _store(self, cache: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor,
               x: torch.Tensor) -> None:
        cache[pages, offs] = x

    def _load(self, cache: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """``pages``/``offs`` of any shape ``S`` -> ``[*S, Hk, D]``."""
        return cache[pages, offs]

    # -- helpers ---------------------------------------------------------------------------
    def _check(self, q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        c = self.config
        if q.dim() != 3 or q.shape[1:] != (c.num_q_heads, c.head_size):
            raise ValueError(f"attention: q must be [T, {c.num_q_heads}, {c.head_size}], "
                             f"got {tuple(q.shape)}")
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"attention: q has {q.shape[0]} rows but the metadata has "
                             f"{meta.num_tokens} new tokens")
        if k_cache.shape[1:] != self.kv_cache_shape(1)[1:]:
            raise ValueError(f"attention: cache shape {tuple(k_cache.shape)} does not match "
                             f"{self.kv_layout.value} layout {self.kv_cache_shape(-1)}")

    def _slots(self, meta: AttentionMetadata, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page and in-page offset of positions ``0..width-1`` of every sequence, ``[B, width]``
        each (positions past a sequence's end land on padding page 0)."""
        ps = meta.page_size
        pos = torch.arange(width, device=meta.kv_page_indices.device)
        table = meta.block_table.to(torch.long)
        page_col = (pos // ps).clamp(max=table.shape[1] - 1)
        return table[:, page_col], (pos % ps).expand(table.shape[0], -1)

    # -- contract --------------------------------------------------------------------------
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store ``k/v [T, Hk, D]`` at slots ``meta.out_cache_loc``; nothing else changes."""
        c = self.config
        if k.shape != v.shape or k.shape[1:] != (c.num_kv_heads, c.head_size):
            raise ValueError(f"write_kv: k/v must be [T, {c.num_kv_heads}, {c.head_size}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != meta.out_cache_loc.shape[0]:
            raise ValueError(f"write_kv: {k.shape[0]} tokens but {meta.out_cache_loc.shape[0]} "
                             "cache locations")
        loc = meta.out_cache_loc.to(torch.long)
        pages, offs = loc // meta.page_size, loc % meta.page_size
        self._store(k_cache, pages, offs, _to_cache(k, k_cache.dtype))
        self._store(v_cache, pages, offs, _to_cache(v, v_cache.dtype))

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each new token over its prefix and the new tokens before it."""
        self._check(q, k_cache, meta)
        c = self.config
        hk, group, d = c.num_kv_heads, c.num_q_heads // c.num_kv_heads, c.head_size
        out = torch.empty_like(q)
        if q.shape[0] == 0:
            return out
        pages, offs = self._slots(meta, meta.max_seq_len)
        device, window = q.device, layer.sliding_window
        q_start = 0
        for b, (seq_len, prefix) in enumerate(zip(meta.seq_lens_cpu, meta.prefix_lens_cpu)):
            n_new = seq_len - prefix
            if n_new <= 0:
                continue
            # [L, Hk, D] -> [1, Hk, L, D]
            k_seq = self._load(k_cache, pages[b, :seq_len], offs[b, :seq_len])
            v_seq = self._load(v_cache, pages[b, :seq_len], offs[b, :seq_len])
            k_seq = k_seq.to(torch.float32).transpose(0, 1)[None]
            v_seq = v_seq.to(torch.float32).transpose(0, 1)[None]
            k_pos = torch.arange(seq_len, device=device)
            chunk = max(1, _SCORE_BUDGET // max(1, c.num_q_heads * seq_len))
            for lo in range(0, n_new, chunk):
                hi = min(n_new, lo + chunk)
                rows = slice(q_start + lo, q_start + hi)
                # [n, Hq, D] -> [1, Hk, G, n, D]
                q_blk = q[rows].reshape(hi - lo, hk, group, d).permute(1, 2, 0, 3)[None]
                q_pos = torch.arange(prefix + lo, prefix + hi, device=device)
                # only keys some query of this chunk can see: causal end, window start
                k_lo = 0 if window is None else max(0, prefix + lo - window + 1)
                keys = slice(k_lo, prefix + hi)
                allowed = _mask(q_pos[:, None], k_pos[None, keys], seq_len, window)
                o = _attend(q_blk, k_seq[:, :, keys], v_seq[:, :, keys],
                            allowed[None, None, None], layer)
                out[rows] = o[0].permute(2, 0, 1, 3).reshape(hi - lo, c.num_q_heads, d).to(q.dtype)
            q_start += n_new
        return out

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence (at position ``seq_len - 1``) over its whole cache."""
        self._check(q, k_cache, meta)
        if q.shape[0] != meta.batch_size:
            raise ValueError(f"decode: expected one query per sequence ({meta.batch_size}), "
                             f"got {q.shape[0]}")
        c = self.config
        bsz, hk, group, d = q.shape[0], c.num_kv_heads, c.num_q_heads // c.num_kv_heads, c.head_size
        if bsz == 0:
            return torch.empty_like(q)
        width = meta.max_seq_len
        pages, offs = self._slots(meta, width)
        seq_lens = meta.seq_lens.to(torch.long).view(bsz, 1, 1)
        k_pos = torch.arange(width, device=q.device).view(1, 1, width)
        # Padding slots hold whatever the pool holds (maybe NaN); zero them so that masked
        # positions contribute exactly nothing.
        in_seq = (k_pos < seq_lens).view(bsz, 1, width, 1)
        k_all = self._load(k_cache, pages, offs).to(torch.float32).transpose(1, 2)  # [B, Hk, L, D]
        v_all = self._load(v_cache, pages, offs).to(torch.float32).transpose(1, 2)
        k_all = torch.where(in_seq, k_all, torch.zeros((), dtype=k_all.dtype, device=q.device))
        v_all = torch.where(in_seq, v_all, torch.zeros((), dtype=v_all.dtype, device=q.device))
        allowed = _mask(seq_lens - 1, k_pos, seq_lens, layer.sliding_window)  # [B, 1, L]
        q_blk = q.reshape(bsz, hk, group, 1, d)
        o = _attend(q_blk, k_all, v_all, allowed.view(bsz, 1, 1, 1, width), layer)
        return o.reshape(bsz, c.num_q_heads, d).to(q.dtype)


class TorchNativeAttentionHND(TorchNativeAttention):
    """:class:`TorchNativeAttention` over HND caches ``[pages, Hk, page_size, D]``."""

    kv_layout = KVLayout.HND

    def _store(self, cache: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor,
               x: torch.Tensor) -> None:
        cache[pages, :, offs] = x

    def _load(self, cache: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return cache[pages, :, offs]
