"""Paged attention through flashinfer's batch wrappers (contract: ``core/kernels/attention.py``).

``extend`` uses ``BatchPrefillWithPagedKVCacheWrapper`` (causal; flashinfer aligns the causal
mask to the end of the KV, which is exactly "new token ``i`` sits at ``prefix + i``");
``decode`` uses ``BatchDecodeWithPagedKVCacheWrapper``. Both read the NHD caches as a
``(k_cache, v_cache)`` tuple and take the metadata's CSR page table as is
(``kv_page_indptr``, ``kv_page_indices``, ``kv_last_page_len``).

Plans depend on the layer's scale, window and soft cap, so one wrapper exists per
(mode, scale, window, cap) and is planned at most once per step, on first use. The host-side
index arrays are built from the metadata's host lengths (no device-to-host copy). flashinfer
is imported when the backend is constructed, never at plugin load. The plans hold host state
and device buffers that ``plan`` replaces, so this backend must not be captured in a device
graph (``TritonAttention`` can be).
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata, ForwardMode,
)
from heteroserve.core.platform import KVLayout

WORKSPACE_BYTES = 128 * 1024 * 1024
HEAD_SIZES = (64, 128, 256)
DTYPES = (torch.bfloat16, torch.float16)
#: group sizes above this use the tensor-core (prefill-kernel) decode path
CUDA_CORE_DECODE_MAX_GROUP = 8


def _host_arrays(meta: AttentionMetadata) -> dict[str, torch.Tensor]:
    """int32 host copies of qo_indptr, kv_page_indptr and kv_last_page_len, from host lengths."""
    ps = meta.page_size
    pages = [-(-s // ps) for s in meta.seq_lens_cpu]
    qo, kv = [0], [0]
    for n, p in zip(meta.extend_lens_cpu, pages):
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + p)
    last = [s - (p - 1) * ps for s, p in zip(meta.seq_lens_cpu, pages)]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return {"qo_indptr": i32(qo), "kv_indptr": i32(kv), "last_page_len": i32(last)}


class FlashInferAttention(AttentionBackend):
    """flashinfer paged attention, NHD, any page size, bf16/fp16, head sizes 64/128/256,
    GQA, sliding window, logit soft cap. Raises ``ValueError`` for an unsupported config and
    ``ImportError`` when flashinfer cannot be imported."""

    kv_layout = KVLayout.NHD
    page_sizes = None
    #: not part of the AttentionBackend contract: plans hold buffers that ``plan`` replaces,
    #: so a captured graph would replay stale page tables (TritonAttention sets True)
    graph_safe = False

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        if config.dtype not in DTYPES:
            raise ValueError(f"FlashInferAttention: dtype {config.dtype} not supported "
                             "(bf16, fp16)")
        if config.head_size not in HEAD_SIZES:
            raise ValueError(f"FlashInferAttention: head size {config.head_size} not in "
                             f"{HEAD_SIZES}")
        import flashinfer  # noqa: PLC0415  (vendor import only when this backend is built)

        self._fi: Any = flashinfer
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=config.device)
        self._wrappers: dict[tuple[Any, ...], Any] = {}
        self._planned: set[tuple[Any, ...]] = set()
        self._meta: AttentionMetadata | None = None
        self._host: dict[str, torch.Tensor] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        """Forget last step's plans; build this step's host index arrays."""
        self._meta = meta
        self._planned.clear()
        self._host = _host_arrays(meta)

    def _wrapper(self, layer: AttentionLayer, meta: AttentionMetadata) -> Any:
        if meta is not self._meta:
            self.prepare(meta)
        key = (meta.mode, layer.scale, layer.sliding_window, layer.logit_cap)
        c = self.config
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            if meta.mode is ForwardMode.DECODE:
                wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD",
                    use_tensor_cores=c.num_q_heads // c.num_kv_heads > CUDA_CORE_DECODE_MAX_GROUP)
            else:
                wrapper = self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
            self._wrappers[key] = wrapper
        if key not in self._planned:
            common = dict(
                sm_scale=float(layer.scale),
                window_left=(layer.sliding_window - 1) if layer.sliding_window else -1,
                logits_soft_cap=float(layer.logit_cap) if layer.logit_cap else None,
                q_data_type=c.dtype, kv_data_type=c.dtype)
            h = self._host
            if meta.mode is ForwardMode.DECODE:
                wrapper.plan(h["kv_indptr"], meta.kv_page_indices, h["last_page_len"],
                             c.num_q_heads, c.num_kv_heads, c.head_size, meta.page_size,
                             **common)
            else:
                wrapper.plan(h["qo_indptr"], h["kv_indptr"], meta.kv_page_indices,
                             h["last_page_len"], c.num_q_heads, c.num_kv_heads, c.head_size,
                             meta.page_size, causal=True, **common)
            self._planned.add(key)
        return wrapper

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Scatter ``k``/``v`` ``[T, Hk, D]`` to slots ``meta.out_cache_loc`` (torch index_copy
        into the contiguous NHD caches)."""
        c = self.config
        if k.shape != v.shape or tuple(k.shape[1:]) != (c.num_kv_heads, c.head_size):
            raise ValueError(f"write_kv: k/v must be [T, {c.num_kv_heads}, {c.head_size}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        loc = meta.out_cache_loc.to(torch.int64)
        k_cache.view(-1, c.num_kv_heads, c.head_size).index_copy_(0, loc, k.to(k_cache.dtype))
        v_cache.view(-1, c.num_kv_heads, c.head_size).index_copy_(0, loc, v.to(v_cache.dtype))

    def _check(self, q: torch.Tensor, meta: AttentionMetadata) -> None:
        c = self.config
        if q.dim() != 3 or tuple(q.shape[1:]) != (c.num_q_heads, c.head_size):
            raise ValueError(f"attention: q must be [T, {c.num_q_heads}, {c.head_size}], "
                             f"got {tuple(q.shape)}")
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"attention: q has {q.shape[0]} rows but the metadata has "
                             f"{meta.num_tokens} new tokens")

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, ``[T, Hq, D]``."""
        self._check(q, meta)
        if q.shape[0] == 0:
            return torch.empty_like(q)
        return self._wrapper(layer, meta).run(q.contiguous(), (k_cache, v_cache))

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence over its whole cache, ``[B, Hq, D]``."""
        self._check(q, meta)
        if q.shape[0] == 0:
            return torch.empty_like(q)
        return self._wrapper(layer, meta).run(q.contiguous(), (k_cache, v_cache))
