"""Paged attention through flashinfer's batch wrappers (contract: ``core/kernels/attention.py``).

``extend`` uses ``BatchPrefillWithPagedKVCacheWrapper`` (causal; flashinfer aligns the causal
mask to the end of the KV, which is exactly "new token ``i`` sits at ``prefix + i``");
``decode`` uses ``BatchDecodeWithPagedKVCacheWrapper``. Both read the NHD caches as a
``(k_cache, v_cache)`` tuple and take the metadata's CSR page table as is
(``kv_page_indptr``, ``kv_page_indices``, ``kv_last_page_len``).

Plans depend on the layer's scale, window and soft cap, so one wrapper exists per
(mode, scale, window, cap) and is planned at most once per step, on first use. The host-side
index arrays are built from the metadata's host lengths (no device-to-host copy). flashinfer
is imported when the backend is constructed, never at plugin load.

Decode graphs: for the static metadata of each captured batch size
(:meth:`begin_graph_capture`), decode uses wrappers built with ``use_cuda_graph=True`` on
that metadata's own page-table tensors, planned on first use (the warm-up, outside the
capture) and re-planned from the new host lengths in :meth:`before_graph_replay`, so a
replay never reads a stale plan. (Conformance ``graph_replay_grow`` checks this against the
float64 oracle: passed on an H200, and on the CPU through the flashinfer double, which
refuses a replay whose plan disagrees with the buffers.)
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


def host_index_arrays(meta: AttentionMetadata) -> dict[str, torch.Tensor]:
    """int32 host CSR arrays of ``meta`` from its host lengths (no device read):
    ``qo_indptr``, ``kv_indptr`` (pages), ``last_page_len`` and ``seq_lens``."""
    ps = meta.page_size
    pages = [-(-s // ps) for s in meta.seq_lens_cpu]
    qo, kv = [0], [0]
    for n, p in zip(meta.extend_lens_cpu, pages):
        qo.append(qo[-1] + n)
        kv.append(kv[-1] + p)
    last = [s - (p - 1) * ps for s, p in zip(meta.seq_lens_cpu, pages)]

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return {"qo_indptr": i32(qo), "kv_indptr": i32(kv), "last_page_len": i32(last),
            "seq_lens": i32(list(meta.seq_lens_cpu))}


class FlashInferAttention(AttentionBackend):
    """flashinfer paged attention, NHD, any page size, bf16/fp16, head sizes 64/128/256,
    GQA, sliding window, logit soft cap. Raises ``ValueError`` for an unsupported config and
    ``ImportError`` when flashinfer cannot be imported."""

    kv_layout = KVLayout.NHD
    page_sizes = None
    graph_safe = True  # through the graph wrappers (module docstring)

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
        #: id(static meta) -> (that meta, its graph wrappers by key)
        self._graphs: dict[int, tuple[AttentionMetadata, dict[tuple[Any, ...], Any]]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        """Forget last step's plans; build this step's host index arrays."""
        self._meta = meta
        self._planned.clear()
        self._host = host_index_arrays(meta)

    def begin_graph_capture(self, meta: AttentionMetadata) -> None:
        """Decode over ``meta`` from now on uses graph wrappers bound to its tensors."""
        if meta.mode is ForwardMode.DECODE:
            self._graphs[id(meta)] = (meta, {})

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """Re-plan every graph wrapper of ``meta`` from its current host lengths."""
        entry = self._graphs.get(id(meta))
        if entry is None or entry[0] is not meta:
            return
        host = host_index_arrays(meta)
        for key, wrapper in entry[1].items():
            self._plan(wrapper, key, meta, host)

    @staticmethod
    def _key(layer: AttentionLayer, meta: AttentionMetadata) -> tuple[Any, ...]:
        return (meta.mode, layer.scale, layer.sliding_window, layer.logit_cap)

    def _plan(self, wrapper: Any, key: tuple[Any, ...], meta: AttentionMetadata,
              host: dict[str, torch.Tensor]) -> None:
        c = self.config
        _, scale, window, cap = key
        common = dict(
            sm_scale=float(scale), window_left=(window - 1) if window else -1,
            logits_soft_cap=float(cap) if cap else None, q_data_type=c.dtype,
            kv_data_type=c.dtype)
        if meta.mode is ForwardMode.DECODE:
            wrapper.plan(host["kv_indptr"], meta.kv_page_indices, host["last_page_len"],
                         c.num_q_heads, c.num_kv_heads, c.head_size, meta.page_size, **common)
        else:
            wrapper.plan(host["qo_indptr"], host["kv_indptr"], meta.kv_page_indices,
                         host["last_page_len"], c.num_q_heads, c.num_kv_heads, c.head_size,
                         meta.page_size, causal=True, **common)

    def _tensor_cores(self) -> bool:
        c = self.config
        return c.num_q_heads // c.num_kv_heads > CUDA_CORE_DECODE_MAX_GROUP

    def _graph_wrapper(self, key: tuple[Any, ...], meta: AttentionMetadata,
                       wrappers: dict[tuple[Any, ...], Any]) -> Any:
        wrapper = wrappers.get(key)
        if wrapper is None:  # first use is the warm-up, outside the capture
            wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True,
                use_tensor_cores=self._tensor_cores(),
                paged_kv_indptr_buffer=meta.kv_page_indptr,
                paged_kv_indices_buffer=meta.kv_page_indices,
                paged_kv_last_page_len_buffer=meta.kv_last_page_len)
            self._plan(wrapper, key, meta, host_index_arrays(meta))
            wrappers[key] = wrapper
        return wrapper

    def _wrapper(self, layer: AttentionLayer, meta: AttentionMetadata) -> Any:
        key = self._key(layer, meta)
        entry = self._graphs.get(id(meta))
        if entry is not None and entry[0] is meta:
            return self._graph_wrapper(key, meta, entry[1])
        if meta is not self._meta:
            self.prepare(meta)
        wrapper = self._wrappers.get(key)
        if wrapper is None:
            if meta.mode is ForwardMode.DECODE:
                wrapper = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, "NHD", use_tensor_cores=self._tensor_cores())
            else:
                wrapper = self.prefill_wrapper()
            self._wrappers[key] = wrapper
        if key not in self._planned:
            self._plan(wrapper, key, meta, self._host)
            self._planned.add(key)
        return wrapper

    def prefill_wrapper(self) -> Any:
        """A new ``BatchPrefillWithPagedKVCacheWrapper`` (NHD) on this backend's workspace,
        unplanned."""
        return self._fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

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
