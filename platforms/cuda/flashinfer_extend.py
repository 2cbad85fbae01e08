"""``TritonAttentionFlashInferExtend``: :class:`TritonAttention` except for long extends, which
run in flashinfer's paged prefill (:meth:`FlashInferAttention.extend`:
``BatchPrefillWithPagedKVCacheWrapper``, whose ``backend="auto"`` plans FA3 on sm90).

When: every sequence of the step has at least :attr:`min_new_tokens` new tokens (whole long
prompts and the chunks of chunked prefill), the caches hold the model dtype (no fp8), and
flashinfer serves the config (bf16/fp16, head size 64/128/256). A prefix is attended in the
same call: flashinfer aligns the causal mask to the end of the keys, and it reads the pages
in place, so there is no gather, no query copy beyond ``q.contiguous()`` and no merge.
Anything else, decode included, is the Triton kernels' (so decode graphs are the Triton ones).

Why: on an H100 (2026-12-07, ``benchmarks/results/h100-20261207-0759-fa3_vs_cudnn_8k.json``)
flashinfer's FA3 ran one layer of an 8k prompt (32 / 8 heads, head 128, bf16, causal) at
675 TF/s against 590 for the cuDNN kernel of the default ``triton_sdpa_extend``. That was the
ragged wrapper on dense K/V; this backend's paged prefill end to end has not run on a GPU, so
it is registered below the default and ``--kernel attention=triton_flashinfer_extend``
selects it. The first long extend of a layer kind JIT-builds flashinfer's module (105 s for
the ragged FA3 one on 16 cores); :meth:`warm_up` builds the plain layers' at start-up.
"""

from __future__ import annotations

import time

import torch

from heteroserve.core.kernels.attention import (
    AttentionConfig, AttentionLayer, AttentionMetadata, ForwardMode,
)
from heteroserve.platforms.cuda.flashinfer_attention import DTYPES, HEAD_SIZES, FlashInferAttention
from heteroserve.platforms.cuda.sdpa_extend import MIN_NEW_TOKENS
from heteroserve.platforms.triton.attention import TritonAttention


def flashinfer_refuses(config: AttentionConfig) -> str | None:
    """Why this backend's extends stay on Triton for ``config`` (None: flashinfer takes them)."""
    if config.dtype not in DTYPES:
        return f"flashinfer takes bf16/fp16, not {config.dtype}"
    if config.head_size not in HEAD_SIZES:
        return f"flashinfer takes head sizes {list(HEAD_SIZES)}, not {config.head_size}"
    if config.cache_dtype != config.dtype:
        return f"the KV cache is {config.cache_dtype}, not the model's {config.dtype}"
    return None


class TritonAttentionFlashInferExtend(TritonAttention):
    """See the module docstring. Same contract, layouts and limits as :class:`TritonAttention`;
    only long extends take flashinfer's kernel. ``refusal``: why they never do for this
    config (None: they do). Raises ``ImportError`` when flashinfer cannot be imported and
    flashinfer would serve the config."""

    min_new_tokens = MIN_NEW_TOKENS

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        self.refusal = flashinfer_refuses(config)
        self._flashinfer = None if self.refusal else FlashInferAttention(config)

    def _long(self, meta: AttentionMetadata) -> bool:
        return (self._flashinfer is not None and meta.mode is ForwardMode.EXTEND
                and bool(meta.extend_lens_cpu)
                and min(meta.extend_lens_cpu) >= self.min_new_tokens)

    def prepare(self, meta: AttentionMetadata) -> None:
        super().prepare(meta)
        if self._long(meta):
            assert self._flashinfer is not None
            self._flashinfer.prepare(meta)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, ``[T, Hq, D]``:
        flashinfer's paged prefill for a step of long extends, else the Triton kernel."""
        if self._long(meta):
            assert self._flashinfer is not None
            self._check(q, k_cache, v_cache, meta)
            return self._flashinfer.extend(q, k_cache, v_cache, layer, meta)
        return super().extend(q, k_cache, v_cache, layer, meta)

    def warm_up(self, max_context_len: int, chunk_size: int) -> str | None:
        """Load (JIT-building on first use) flashinfer's paged prefill module of a layer
        without window or soft cap, by planning and running one extend of
        :attr:`min_new_tokens` zero tokens on a scratch cache; None when no step of this
        engine reaches it (the chunk is shorter) or flashinfer never serves the config."""
        if self._flashinfer is None:
            return f"long extends on Triton: {self.refusal}"
        if chunk_size < self.min_new_tokens:
            return None
        c, n = self.config, self.min_new_tokens
        pages = -(-n // c.page_size)
        cache = torch.zeros((pages, c.page_size, c.num_kv_heads, c.head_size), dtype=c.dtype,
                            device=c.device)
        i32 = lambda *values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
        t0 = time.perf_counter()
        wrapper = self._flashinfer.prefill_wrapper()
        wrapper.plan(i32(0, n), i32(0, pages),
                     torch.arange(pages, dtype=torch.int32, device=c.device),
                     i32(n - (pages - 1) * c.page_size), c.num_q_heads, c.num_kv_heads,
                     c.head_size, c.page_size, causal=True, sm_scale=c.head_size ** -0.5,
                     q_data_type=c.dtype, kv_data_type=c.dtype)
        q = torch.zeros((n, c.num_q_heads, c.head_size), dtype=c.dtype, device=c.device)
        wrapper.run(q, (cache, cache))
        return (f"flashinfer paged prefill ready for extends of {n}+ tokens a sequence "
                f"({time.perf_counter() - t0:.1f} s)")
