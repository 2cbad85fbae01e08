"""The flashinfer adapter's decode-graph path, on the flashinfer double: wrappers bound to the
static metadata's page-table tensors, re-planned before every replay from the new host
lengths; a replay whose plan was not refreshed is refused by the double (on a GPU it would
run with a stale split plan)."""

from __future__ import annotations

import pytest
import torch
from heteroserve_vendor_doubles.batches import build_scenario, reference_attention

from heteroserve.conformance.checks import rel_err
from heteroserve.core.kernels.attention import (
    AttentionConfig, AttentionLayer, AttentionMetadata, ForwardMode,
)

HQ, HK, D, PAGE = 4, 2, 64, 4
MAX_PAGES = 64


def _static(bs: int) -> AttentionMetadata:
    """Graph buffers as DecodeGraphs allocates them: one token in page 0 per row."""
    i32 = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    return AttentionMetadata(
        mode=ForwardMode.DECODE, page_size=PAGE,
        qo_indptr=torch.arange(bs + 1, dtype=torch.int32), seq_lens=i32(bs) + 1,
        prefix_lens=i32(bs), kv_page_indptr=torch.arange(bs + 1, dtype=torch.int32),
        kv_page_indices=i32(MAX_PAGES), kv_last_page_len=i32(bs) + 1,
        out_cache_loc=torch.zeros(bs, dtype=torch.int64), seq_lens_cpu=[1] * bs,
        prefix_lens_cpu=[0] * bs)


def _fill(static: AttentionMetadata, meta: AttentionMetadata) -> None:
    """What DecodeGraphs.run does before a replay: copy the step's page table in."""
    n = meta.kv_page_indices.numel()
    static.kv_page_indptr.copy_(meta.kv_page_indptr)
    static.kv_page_indices[:n].copy_(meta.kv_page_indices)
    static.kv_last_page_len.copy_(meta.kv_last_page_len)
    static.seq_lens.copy_(meta.seq_lens)
    static.seq_lens_cpu[:] = meta.seq_lens_cpu
    static.prefix_lens_cpu[:] = meta.prefix_lens_cpu


@pytest.mark.parametrize("window", [None, 5])
def test_graph_decode_replans_before_each_replay(flashinfer_double, window: int | None) -> None:
    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention

    backend = FlashInferAttention(AttentionConfig(HQ, HK, D, PAGE, torch.bfloat16,
                                                  torch.device("cpu")))
    assert backend.graph_safe
    layer = AttentionLayer(0, D ** -0.5, sliding_window=window)
    static = _static(2)
    backend.begin_graph_capture(static)
    warm = _static(2)  # the warm-up / capture step runs on the dummy page table
    cache = torch.zeros(8, PAGE, HK, D, dtype=torch.bfloat16)
    backend.decode(torch.zeros(2, HQ, D, dtype=torch.bfloat16), cache, cache, layer, static)
    assert torch.equal(static.kv_page_indptr, warm.kv_page_indptr)

    for seed, lens in ((1, [9, 5]), (2, [3, 14])):  # two steps, other lengths, same batch
        sc = build_scenario(lens, [n - 1 for n in lens], page_size=PAGE, num_q_heads=HQ,
                            num_kv_heads=HK, head_size=D, dtype=torch.bfloat16, seed=seed)
        backend.write_kv(sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, sc.meta)
        _fill(static, sc.meta)
        backend.before_graph_replay(static)
        out = backend.decode(sc.q, sc.k_cache, sc.v_cache, layer, static)
        assert rel_err(out, reference_attention(sc, layer.scale, window=window)) < 2e-2

    _fill(static, build_scenario([6, 6], [5, 5], page_size=PAGE, num_q_heads=HQ,
                                 num_kv_heads=HK, head_size=D, dtype=torch.bfloat16,
                                 seed=3).meta)
    with pytest.raises(ValueError, match="plan\\(\\) must run before every replay"):
        backend.decode(sc.q, sc.k_cache, sc.v_cache, layer, static)  # no before_graph_replay


def test_eager_decode_does_not_touch_graph_wrappers(flashinfer_double) -> None:
    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention

    backend = FlashInferAttention(AttentionConfig(HQ, HK, D, PAGE, torch.bfloat16,
                                                  torch.device("cpu")))
    layer = AttentionLayer(0, D ** -0.5)
    sc = build_scenario([7, 2, 11], [6, 1, 10], page_size=PAGE, num_q_heads=HQ, num_kv_heads=HK,
                        head_size=D, dtype=torch.bfloat16, seed=4)
    backend.write_kv(sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, sc.meta)
    backend.before_graph_replay(sc.meta)  # not a graph meta: nothing to re-plan
    out = backend.decode(sc.q, sc.k_cache, sc.v_cache, layer, sc.meta)
    assert rel_err(out, reference_attention(sc, layer.scale)) < 2e-2
    assert not backend._graphs
