"""The paged KV cache tensors, sized from the device's free memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionBackend
from heteroserve.core.kernels.mla import MLABackend

Backend = AttentionBackend | MLABackend

logger = logging.getLogger(__name__)
GIB = 1 << 30


@dataclass
class KVStorage:
    """Per-layer K and V caches of ``num_pages`` pages in the backend's layout (an MLA
    backend's single latent cache per layer is ``k_caches``; ``v_caches`` is then empty).
    Page 0 is reserved (never handed to a request)."""

    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    num_pages: int
    page_size: int
    bytes_per_page: int

    @property
    def num_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page


def bytes_per_page(backend: Backend, num_layers: int, dtype: torch.dtype) -> int:
    per_layer = 1
    for d in backend.kv_cache_shape(1):
        per_layer *= d
    return backend.caches_per_layer * num_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def plan_num_pages(free_bytes: int, total_bytes: int, mem_fraction: float, page_bytes: int,
                   page_size: int, max_total_tokens: int | None, token_cap: int,
                   max_pool_bytes: int | None = None) -> int:
    """Pages for the KV pool (page 0 included): what remains of ``mem_fraction`` of the device
    after what is already used (weights), at most ``max_pool_bytes`` (a platform's cap, e.g.
    for host memory shared with everything else), and at most ``token_cap`` tokens.
    ``max_total_tokens`` (the user's explicit size) overrides the memory-based size. At least
    2 pages; ``RuntimeError`` when memory allows none."""
    budget = free_bytes - int(total_bytes * (1.0 - mem_fraction))
    if max_pool_bytes is not None:
        budget = min(budget, max_pool_bytes)
    pages = budget // page_bytes
    if max_total_tokens is not None:
        wanted = -(-max_total_tokens // page_size) + 1
        pages = min(pages, wanted) if pages > 0 else wanted
    pages = min(pages, -(-token_cap // page_size) + 1)
    if pages < 2:
        raise RuntimeError(
            f"no memory left for the KV cache ({free_bytes / GIB:.2f} GiB free of "
            f"{total_bytes / GIB:.2f} GiB; raise --mem-fraction-static or set --max-total-tokens)")
    return int(pages)


def allocate(backend: Backend, num_layers: int, num_pages: int, dtype: torch.dtype,
             device: torch.device) -> KVStorage:
    shape = backend.kv_cache_shape(num_pages)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device)
         for _ in range(num_layers if backend.caches_per_layer == 2 else 0)]
    return KVStorage(k, v, num_pages, backend.config.page_size,
                     bytes_per_page(backend, num_layers, dtype))
