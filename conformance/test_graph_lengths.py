"""Graph replay at new lengths: a decode step captured at one set of KV lengths, then replayed
after its metadata is rewritten in place for longer sequences (more pages), as the engine's
decode graphs do every step. Runs for every graph-safe attention backend, through the graph
hooks the engine calls (``begin_graph_capture`` before capture, ``before_graph_replay`` before
each replay), against the float64 oracle at both lengths."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from heteroserve.conformance.attention_setup import make_setup, write_and_check
from heteroserve.conformance.cases.platform import graph_cases
from heteroserve.conformance.checks import assert_close
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles.attention import attention as attention_ref
from heteroserve.conformance.paged import metadata_for
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode

#: tokens each sequence gains between the first and the second replay (one stays in its page,
#: the others cross page boundaries)
GROW = (1, 30, 100)


def copy_into(static: AttentionMetadata, new: AttentionMetadata) -> None:
    """Rewrite ``static``'s device tensors and host lengths in place with ``new``'s (same batch
    size; ``static.kv_page_indices`` at least as long as ``new``'s)."""
    for name in ("qo_indptr", "seq_lens", "prefix_lens", "kv_page_indptr", "kv_last_page_len",
                 "out_cache_loc"):
        getattr(static, name).copy_(getattr(new, name))
    static.kv_page_indices[: new.kv_page_indices.numel()].copy_(new.kv_page_indices)
    static.seq_lens_cpu[:] = new.seq_lens_cpu
    static.prefix_lens_cpu[:] = new.prefix_lens_cpu
    static.__dict__.pop("block_table", None)


@conformance(graph_cases, label="graph_replay_grow")
def test_graph_replay_new_lengths(conf: ConfParam, ctx: ConformanceContext,
                                  request: pytest.FixtureRequest) -> None:
    if not conf.load().graph_safe:
        pytest.skip(f"{conf.impl} is not graph-safe: the engine runs its decode eagerly")
    case = conf.case
    grown = replace(case, seqs=tuple((p + n + g - 1, 1)
                                     for (p, n), g in zip(case.seqs, GROW)))  # type: ignore[attr-defined]
    s = make_setup(replace(conf, case=grown), ctx)
    write_and_check(s)  # the caches now hold every grown sequence's K/V
    dev = ctx.device

    def short_meta() -> AttentionMetadata:
        return metadata_for(s.batch.pages, case.seqs, case.page_size,  # type: ignore[attr-defined]
                            ForwardMode.DECODE, dev)

    short = short_meta()
    # the graph's own buffers (no tensor or list shared with ``short``); its page table is as
    # long as the grown one and, past the short table, holds pages the short sequences do not
    # use, as the engine's static buffers do
    indices = s.batch.meta.kv_page_indices.clone()
    indices[: short.kv_page_indices.numel()].copy_(short.kv_page_indices)
    static = replace(short_meta(), kv_page_indices=indices)
    out = torch.zeros_like(s.q)

    def step() -> None:
        s.backend.prepare(static)
        out.copy_(s.backend.decode(s.q, s.k_cache, s.v_cache, s.layer, static))

    s.backend.begin_graph_capture(static)
    graph = ctx.platform.make_graph_runner(dev).capture(step)
    for label, meta in (("captured lengths", short), ("grown lengths", s.batch.meta)):
        copy_into(static, meta)
        s.backend.before_graph_replay(static)
        graph.replay()
        ctx.platform.synchronize(dev)
        lens = meta.seq_lens_cpu
        ref = attention_ref(s.q, [k[:n] for k, n in zip(s.keys, lens)],
                            [v[:n] for v, n in zip(s.values, lens)], [1] * len(lens),
                            s.layer.scale)
        assert_close(out, ref, case.dtype, f"replayed decode at {label} {lens}", request)
