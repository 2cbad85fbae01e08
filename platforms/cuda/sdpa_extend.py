"""``TritonAttentionSDPAExtend``: :class:`TritonAttention` whose long extends run in torch's
fused scaled-dot-product attention (the FlashAttention kernel torch ships for CUDA).

Why: on an H200 the Triton extend kernel reaches 47-54 % of the bf16 matmul rate on long
prompts (no TMA or warp specialisation), and a prompt of 32k-100k tokens spends 84-94 % of its
prefill there; torch's flash kernel ran a dense causal 4096-16384 prompt at 526-580 TFLOP/s
against Triton's 316-339 (``docs/benchmarks/kernels-h100.md``).

How: each sequence's K/V rows are gathered out of the paged cache once per layer (``[L, Hk,
D]``, the layout the flash kernel reads without a copy) and attended with a bottom-right
causal mask (new token ``i`` sees the prefix and new tokens ``<= i``) and native GQA. The
gather costs a read and a write of the sequence's K/V, small next to the attention's
``O(new x L)`` work from about a thousand new tokens on.

When: every sequence of the step has at least :attr:`min_new_tokens` new tokens, the layer
has no sliding window and no logit soft-cap, q and the caches share a bf16/fp16 dtype, and
torch says its flash kernel takes the shapes (``torch.backends.cuda.can_use_flash_attention``).
Anything else, decode included, is :class:`TritonAttention`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from heteroserve.core.kernels.attention import AttentionLayer, AttentionMetadata
from heteroserve.platforms.triton.attention import TritonAttention

#: fewest new tokens of every sequence for the dense path; below it the per-sequence gathers
#: and launches are not worth it and one Triton launch serves the whole batch
MIN_NEW_TOKENS = 1024


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's flash SDPA kernel takes ``q [1, Hq, n, D]``, ``k/v [1, Hk, L, D]`` with
    GQA (False off CUDA)."""
    if q.device.type != "cuda":
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, True), False))


class TritonAttentionSDPAExtend(TritonAttention):
    """See the module docstring. Same contract, layouts and limits as
    :class:`TritonAttention`; only the extend of long prompts takes another kernel."""

    min_new_tokens = MIN_NEW_TOKENS

    def _dense(self, q: torch.Tensor, k_cache: torch.Tensor, layer: AttentionLayer,
               meta: AttentionMetadata) -> bool:
        return (layer.sliding_window is None and layer.logit_cap is None
                and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
                and min(meta.extend_lens_cpu, default=0) >= self.min_new_tokens)

    def _flash_usable(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        return flash_usable(q, k, v)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, ``[T, Hq, D]``."""
        if not self._dense(q, k_cache, layer, meta):
            return super().extend(q, k_cache, v_cache, layer, meta)
        self._check(q, k_cache, v_cache, meta)
        c = self.config
        ps = meta.page_size
        hk, d = c.num_kv_heads, c.head_size
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
        offsets = torch.arange(ps, device=q.device)
        page_at = row_at = 0
        for seq_len, new in zip(meta.seq_lens_cpu, meta.extend_lens_cpu):
            pages = -(-seq_len // ps)
            table = meta.kv_page_indices[page_at:page_at + pages].to(torch.long)
            slots = (table[:, None] * ps + offsets).reshape(-1)[:seq_len]
            k_seq = flat_k.index_select(0, slots).transpose(0, 1)[None]  # [1, Hk, L, D]
            v_seq = flat_v.index_select(0, slots).transpose(0, 1)[None]
            rows = slice(row_at, row_at + new)
            q_seq = q[rows].transpose(0, 1)[None]  # [1, Hq, n, D]
            if not self._flash_usable(q_seq, k_seq, v_seq):
                return super().extend(q, k_cache, v_cache, layer, meta)
            mask = causal_lower_right(new, seq_len) if new != seq_len else None
            o = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask,
                                               is_causal=mask is None, scale=layer.scale,
                                               enable_gqa=hk != c.num_q_heads)
            out[rows] = o[0].transpose(0, 1)
            page_at += pages
            row_at += new
        return out
