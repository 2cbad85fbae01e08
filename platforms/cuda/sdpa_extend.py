"""``TritonAttentionSDPAExtend``: :class:`TritonAttention` whose long prompts without a cached
prefix run in torch's fused scaled-dot-product attention.

Why: on an H200 the Triton extend kernel reaches 47-54 % of the bf16 matmul rate on long
prompts (no TMA or warp specialisation); torch's causal SDPA ran a dense 4096-16384 prompt at
526-580 TFLOP/s against Triton's 316-339 (``docs/benchmarks/kernels-h100.md``). Measured in
the engine (H200, ``bench_headline.py``, chunks of 8192): an 8k prompt's prefill went from
75.5 % to 82.7 % of its FLOP floor. Chunks on top of a cached prefix need a bottom-right
causal mask, which torch serves with its FlashAttention-2 kernel: that was slower than Triton
(32k: 61.4 against 66.2 %, 100k: 51.6 against 58.1 %), so those stay with Triton.

How: each sequence's K/V rows are gathered out of the paged cache once per layer (``[L, Hk,
D]``, a layout the fused kernels read without a copy) and attended causally with native GQA.
The gather costs a read and a write of the sequence's K/V, small next to the attention's
``O(L^2)`` work from a few thousand tokens on.

When: every sequence of the step starts at position 0 (no cached prefix) with at least
:attr:`min_new_tokens` new tokens, the layer has no sliding window and no logit soft-cap, q
and the caches share a bf16/fp16 dtype, and torch says its flash kernel takes the shapes
(``torch.backends.cuda.can_use_flash_attention``: no slow unfused fallback). Anything else,
decode included, is :class:`TritonAttention`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from heteroserve.core.kernels.attention import AttentionLayer, AttentionMetadata
from heteroserve.platforms.triton.attention import TritonAttention

#: fewest new tokens of every sequence for the dense path; below it the per-sequence gathers
#: and launches are not worth it and one Triton launch serves the whole batch (1024: the
#: 1024 x (1024/256) offline workload ran 2.7 % slower through SDPA than through Triton)
MIN_NEW_TOKENS = 2048


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
                and not any(meta.prefix_lens_cpu)
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
            o = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, is_causal=True,
                                               scale=layer.scale, enable_gqa=hk != c.num_q_heads)
            out[rows] = o[0].transpose(0, 1)
            page_at += pages
            row_at += new
        return out
