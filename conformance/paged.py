"""Paged-KV test fixtures: attention metadata for a batch, caches poisoned with a sentinel,
and direct cache writes and reads in either KV layout (independent of any backend)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.conformance.checks import sentinel
from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.platform import KVLayout


def _slots(pages: list[int], page_size: int, start: int, stop: int) -> torch.Tensor:
    pos = torch.arange(start, stop)
    return torch.tensor(pages, dtype=torch.int64)[pos // page_size] * page_size + pos % page_size


@dataclass
class PagedBatch:
    """A batch's metadata plus what the test needs to fill and check caches: each sequence's
    pages (in order) and ``num_pages`` (page 0 reserved and never used)."""

    meta: AttentionMetadata
    pages: list[list[int]]
    num_pages: int

    def slots(self, b: int, start: int, stop: int) -> torch.Tensor:
        """int64 host slots of positions ``start..stop-1`` of sequence ``b``."""
        return _slots(self.pages[b], self.meta.page_size, start, stop)


def build_batch(seqs: tuple[tuple[int, int], ...], page_size: int, mode: ForwardMode,
                device: torch.device, gen: torch.Generator, spare_pages: int = 3) -> PagedBatch:
    """Metadata for sequences ``(prefix_len, new_len)`` whose pages are scattered at random
    over a pool with ``spare_pages`` unused pages besides the reserved page 0."""
    counts = [-(-(p + n) // page_size) for p, n in seqs]
    num_pages = 1 + sum(counts) + spare_pages
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    pages = [perm[offsets[b]: offsets[b + 1]] for b in range(len(seqs))]
    return PagedBatch(metadata_for(pages, seqs, page_size, mode, device), pages, num_pages)


def metadata_for(pages: list[list[int]], seqs: tuple[tuple[int, int], ...], page_size: int,
                 mode: ForwardMode, device: torch.device) -> AttentionMetadata:
    """The metadata of sequences ``(prefix_len, new_len)`` stored in ``pages`` (sequence
    ``b``'s first ``ceil((prefix + new) / page_size)`` pages are used; later ones ignored)."""
    counts = [-(-(p + n) // page_size) for p, n in seqs]
    used = [ps[:c] for ps, c in zip(pages, counts)]
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    seq_lens = [p + n for p, n in seqs]
    loc = torch.cat([_slots(used[b], page_size, p, p + n) for b, (p, n) in enumerate(seqs)])

    def i32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return AttentionMetadata(
        mode=mode, page_size=page_size,
        qo_indptr=i32([0, *torch.tensor([n for _, n in seqs]).cumsum(0).tolist()]),
        seq_lens=i32(seq_lens), prefix_lens=i32([p for p, _ in seqs]),
        kv_page_indptr=i32(offsets), kv_page_indices=i32([p for ps in used for p in ps]),
        kv_last_page_len=i32([s - (c - 1) * page_size for s, c in zip(seq_lens, counts)]),
        out_cache_loc=loc.to(device), seq_lens_cpu=seq_lens,
        prefix_lens_cpu=[p for p, _ in seqs])


def new_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cache tensor filled with :data:`SENTINEL` (fp8: its largest value)."""
    return torch.full(shape, sentinel(dtype), dtype=dtype, device=device)


def as_nhd(cache: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A ``[pages, page_size, heads, dim]`` view of ``cache``."""
    return cache if layout is KVLayout.NHD else cache.transpose(1, 2)


def write_slots(cache: torch.Tensor, layout: KVLayout, slots: torch.Tensor,
                values: torch.Tensor) -> None:
    """Store ``values [n, heads, dim]`` at ``slots`` (the test's own write, for prefixes)."""
    view = as_nhd(cache, layout)
    page = view.shape[1]
    s = slots.to(cache.device)
    view[s // page, s % page] = values.to(cache.device, cache.dtype)


def flat_slots(cache: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """Host copy of ``cache`` as ``[slots, heads, dim]``."""
    view = as_nhd(cache, layout).contiguous()
    return view.reshape(-1, view.shape[2], view.shape[3]).cpu()
