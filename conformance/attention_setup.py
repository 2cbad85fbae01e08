"""Shared set-up of attention conformance tests: a backend built from a case, a paged batch
with cached prefixes written by the suite, and the exact KV-write check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from heteroserve.conformance.cases.attention import AttnCase
from heteroserve.conformance.checks import assert_bitwise_equal, sentinel
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.paged import (
    PagedBatch, build_batch, flat_slots, new_cache, write_slots,
)
from heteroserve.conformance.params import ConfParam
from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, ForwardMode,
)
from heteroserve.core.platform import KVLayout


@dataclass
class Setup:
    """A backend, a batch, caches holding the cached prefixes, and the new tokens' q/k/v
    (``keys``/``values``: each sequence's whole K/V on the host, in the tested dtype)."""

    backend: AttentionBackend
    layout: KVLayout
    batch: PagedBatch
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    layer: AttentionLayer


def make_setup(conf: ConfParam, ctx: ConformanceContext) -> Setup:
    """Build the backend and inputs of an attention case (skips layouts the platform lacks)."""
    case: AttnCase = conf.case  # type: ignore[assignment]
    cls = conf.load()
    layout = KVLayout(cls.kv_layout)
    if layout not in ctx.capabilities.kv_layouts:
        pytest.skip(f"{conf.impl} uses KV layout {layout.value}, which platform {ctx.name} "
                    f"does not declare")
    dev, dt = ctx.device, case.dtype
    flavour = ctx.capabilities.fp8_flavour
    cache_dt = flavour.torch_dtype if case.kv_fp8 and flavour is not None else dt
    lens = [p + n for p, n in case.seqs]
    backend = cls(AttentionConfig(case.q_heads, case.kv_heads, case.head_size, case.page_size,
                                  dt, dev, max_batch_size=max(8, len(lens)),
                                  max_context_len=max(256, 2 * max(lens)),
                                  kv_cache_dtype=cache_dt if case.kv_fp8 else None))
    gen = case.generator()
    mode = ForwardMode.DECODE if case.kind == "decode" else ForwardMode.EXTEND
    batch = build_batch(case.seqs, case.page_size, mode, dev, gen)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    keys = [rand(n, case.kv_heads, case.head_size) for n in lens]
    values = [rand(n, case.kv_heads, case.head_size) for n in lens]
    if case.kv_fp8:  # K/V exactly representable in the cache: writes stay exact checks
        keys = [k.to(cache_dt).to(dt) for k in keys]
        values = [v.to(cache_dt).to(dt) for v in values]
    q = rand(sum(n for _, n in case.seqs), case.q_heads, case.head_size)
    shape = backend.kv_cache_shape(batch.num_pages)
    k_cache, v_cache = new_cache(shape, cache_dt, dev), new_cache(shape, cache_dt, dev)
    for b, (p, _) in enumerate(case.seqs):
        write_slots(k_cache, layout, batch.slots(b, 0, p), keys[b][:p])
        write_slots(v_cache, layout, batch.slots(b, 0, p), values[b][:p])
    k_new = torch.cat([k[p:] for k, (p, _) in zip(keys, case.seqs)]).to(dev)
    v_new = torch.cat([v[p:] for v, (p, _) in zip(values, case.seqs)]).to(dev)
    layer = AttentionLayer(0, case.head_size ** -0.5, case.sliding_window, case.logit_cap)
    return Setup(backend, layout, batch, k_cache, v_cache, keys, values, q.to(dev),
                 k_new, v_new, layer)


def expected_cache(s: Setup, cache: torch.Tensor, seqs: list[torch.Tensor]) -> torch.Tensor:
    """The host ``[slots, heads, dim]`` cache after every sequence's K (or V) is stored."""
    heads, dim = seqs[0].shape[1:]
    want = torch.full((s.batch.num_pages * s.batch.meta.page_size, heads, dim),
                      sentinel(cache.dtype), dtype=cache.dtype)
    for b, x in enumerate(seqs):
        want[s.batch.slots(b, 0, x.shape[0])] = x.to(cache.dtype)
    return want


def write_and_check(s: Setup) -> None:
    """``prepare`` + ``write_kv``, then: the new tokens' slots hold exactly k/v and no other
    slot (prefixes, other pages, page 0, spare pages) changed."""
    s.backend.prepare(s.batch.meta)
    s.backend.write_kv(s.k_new, s.v_new, s.k_cache, s.v_cache, s.batch.meta)
    for name, cache, seqs in (("k", s.k_cache, s.keys), ("v", s.v_cache, s.values)):
        assert_bitwise_equal(flat_slots(cache, s.layout), expected_cache(s, cache, seqs),
                             f"write_kv: {name} cache (only the new tokens' slots may change)")
