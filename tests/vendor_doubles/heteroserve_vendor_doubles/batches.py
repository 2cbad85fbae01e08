"""Paged-attention scenarios for the vendor adapter tests: a batch of sequences with cached
prefixes, its :class:`AttentionMetadata`, NaN-poisoned caches holding the prefixes, and the
dense per-sequence K/V a float64 reference attends over."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.platform import KVLayout


@dataclass
class PagedScenario:
    meta: AttentionMetadata
    q: torch.Tensor          # [T, Hq, D] new tokens' queries
    k_new: torch.Tensor      # [T, Hk, D] new tokens' keys (to be written by the adapter)
    v_new: torch.Tensor
    k_cache: torch.Tensor    # prefixes written, every other slot NaN
    v_cache: torch.Tensor
    k_dense: list[torch.Tensor]  # per sequence [seq_len, Hk, D], all positions
    v_dense: list[torch.Tensor]


def build_scenario(seq_lens: list[int], prefix_lens: list[int], *, page_size: int,
                   num_q_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                   layout: KVLayout = KVLayout.NHD, seed: int = 0) -> PagedScenario:
    """Random inputs; pages are a random permutation of 1..P (page 0 stays reserved)."""
    gen = torch.Generator().manual_seed(seed)
    mode = ForwardMode.DECODE if all(s - p == 1 for s, p in zip(seq_lens, prefix_lens)) \
        and prefix_lens and all(p > 0 for p in prefix_lens) else ForwardMode.EXTEND
    counts = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(counts) + 1 + 2  # page 0 reserved, two spare pages
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    pages, cursor = [], 0
    for c in counts:
        pages.append(order[cursor:cursor + c])
        cursor += c

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    k_dense = [rand(s, num_kv_heads, head_size) for s in seq_lens]
    v_dense = [rand(s, num_kv_heads, head_size) for s in seq_lens]
    shape = ((num_pages, page_size, num_kv_heads, head_size) if layout is KVLayout.NHD
             else (num_pages, num_kv_heads, page_size, head_size))
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)

    def slot(b: int, pos: int) -> int:
        return pages[b][pos // page_size] * page_size + pos % page_size

    def put(cache: torch.Tensor, s: int, value: torch.Tensor) -> None:
        if layout is KVLayout.NHD:
            cache[s // page_size, s % page_size] = value
        else:
            cache[s // page_size, :, s % page_size] = value

    out_loc, k_new, v_new = [], [], []
    for b, (s, p) in enumerate(zip(seq_lens, prefix_lens)):
        for pos in range(p):
            put(k_cache, slot(b, pos), k_dense[b][pos])
            put(v_cache, slot(b, pos), v_dense[b][pos])
        out_loc += [slot(b, pos) for pos in range(p, s)]
        k_new.append(k_dense[b][p:])
        v_new.append(v_dense[b][p:])
    extend = [s - p for s, p in zip(seq_lens, prefix_lens)]
    qo = torch.tensor([0] + extend).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        mode=mode, page_size=page_size, qo_indptr=qo,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        kv_page_indptr=torch.tensor([0] + counts).cumsum(0).to(torch.int32),
        kv_page_indices=torch.tensor([p for ps in pages for p in ps], dtype=torch.int32),
        kv_last_page_len=torch.tensor([s - (c - 1) * page_size for s, c in zip(seq_lens, counts)],
                                      dtype=torch.int32),
        out_cache_loc=torch.tensor(out_loc, dtype=torch.int64),
        seq_lens_cpu=list(seq_lens), prefix_lens_cpu=list(prefix_lens))
    q = rand(int(qo[-1]), num_q_heads, head_size)
    return PagedScenario(meta, q, torch.cat(k_new), torch.cat(v_new), k_cache, v_cache,
                         k_dense, v_dense)


def reference_attention(sc: PagedScenario, scale: float, *, window: int | None = None,
                        soft_cap: float | None = None) -> torch.Tensor:
    """float64 causal attention of every new token over its sequence, ``[T, Hq, D]``
    (window: keys ``p - w < j <= p``; soft cap ``c * tanh(s / c)``)."""
    out = []
    for b, (s, p) in enumerate(zip(sc.meta.seq_lens_cpu, sc.meta.prefix_lens_cpu)):
        q = sc.q[int(sc.meta.qo_indptr[b]):int(sc.meta.qo_indptr[b + 1])].to(torch.float64)
        k = sc.k_dense[b].to(torch.float64)
        v = sc.v_dense[b].to(torch.float64)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        for i in range(s - p):
            pos = p + i
            scores = torch.einsum("hd,khd->hk", q[i], k[: pos + 1]) * scale
            if soft_cap:
                scores = soft_cap * torch.tanh(scores / soft_cap)
            if window is not None:
                scores[:, : max(0, pos - window + 1)] = float("-inf")
            out.append(torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v[: pos + 1]))
    return torch.stack(out)
