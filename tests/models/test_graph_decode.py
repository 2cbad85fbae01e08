"""Decode through captured graphs (padding rows included) equals eager decode. On the CPU
the platform's eager graph runner stands in; the same code captures CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from engine_harness import PagedSequence, cpu_args, decode, extend
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.model_runner.graph_decode import DecodeGraphs, capture_sizes
from heteroserve.core.models.tiny import build_tiny_model


def test_capture_sizes() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(32)[-3:] == [16, 24, 32]


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_graph_replay_equals_eager(tmp_path_factory, batch: int) -> None:
    path = build_tiny_model(tmp_path_factory.mktemp("m"), "qwen3", seed=6)
    _, _, runner = build_model_runner(cpu_args(path, cuda_graph_max_bs=8,
                                               max_running_requests=8))
    if runner.platform.make_graph_runner(runner.device).captures and \
            not getattr(runner.backend, "graph_safe", False):
        pytest.skip(f"{type(runner.backend).__name__} is not graph-safe on a capturing platform")
    graphs = DecodeGraphs(runner)
    prompts = [list(range(3, 3 + 5 * (i + 1))) for i in range(batch)]
    seqs = [PagedSequence(runner, len(p) + 1) for p in prompts]
    logits = extend(runner, [(p, 0, s) for p, s in zip(prompts, seqs)])
    tokens = [int(r.argmax()) for r in logits]
    fb = build_forward_batch([SequenceInput([t], len(p), s.pages)
                              for t, p, s in zip(tokens, prompts, seqs)],
                             ForwardMode.DECODE, runner.page_size, runner.device)
    eager = runner.forward_eager(fb).clone()
    replayed = graphs.run(fb)
    assert replayed.shape == eager.shape
    assert torch.allclose(replayed, eager, rtol=1e-5, atol=1e-5)
    _ = decode  # the harness's decode path is the eager one


def test_graphs_call_the_backend_capture_and_replay_hooks(tmp_path_factory) -> None:
    """Each captured size's static metadata goes to ``begin_graph_capture`` before capture,
    and to ``before_graph_replay`` before each replay, holding that step's host lengths."""
    path = build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=2)
    _, _, runner = build_model_runner(cpu_args(path, cuda_graph_max_bs=4,
                                               max_running_requests=4))
    captured, replayed = [], []
    runner.backend.begin_graph_capture = lambda meta: captured.append(meta.batch_size)
    runner.backend.before_graph_replay = lambda meta: replayed.append(list(meta.seq_lens_cpu))
    graphs = DecodeGraphs(runner)
    assert sorted(captured) == graphs.batch_sizes == [1, 2, 4]
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    seqs = [PagedSequence(runner, len(p) + 1) for p in prompts]
    extend(runner, [(p, 0, s) for p, s in zip(prompts, seqs)])
    fb = build_forward_batch([SequenceInput([3], len(p), s.pages) for p, s in zip(prompts, seqs)],
                             ForwardMode.DECODE, runner.page_size, runner.device)
    graphs.run(fb)
    assert replayed == [[4, 6]]
