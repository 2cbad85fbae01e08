"""``--enable-torch-compile`` on the cpu platform: inductor with freezing and GEMM autotuning
compiles the whole model at start-up (paged attention as one opaque op, the linears' plain
weights packed into the graphs, then released from the modules), and the engine's greedy
output equals the eager engine's, through prefill with a cached prefix, ragged decode batches
and a batch that shrinks to one sequence, without compiling again; a second compiled engine
of the same model class in the process keeps graphs of its own."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from heteroserve.core.layers.linear import LinearBase
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.platforms.cpu.features import detect_cpu_features
from tests.support.engine_harness import cpu_args, run_scheduler


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("compiled"), "llama", seed=11)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler")
def test_compiled_engine_generates_what_the_eager_engine_does(model, tmp_path) -> None:
    import torch._dynamo.utils

    # one shared prefix (a radix hit for the later prompts) and three lengths
    shared = list(range(40, 72))
    prompts = [shared + list(range(3, 3 + n)) for n in (5, 12, 19)]
    args = cpu_args(model, max_running_requests=4)
    eager, _ = run_scheduler(args, prompts, max_new_tokens=6)
    # different lengths: sequences finish at different steps, the batch shrinks to one
    ragged, _ = run_scheduler(args, prompts[:2], max_new_tokens=9)

    torch._dynamo.utils.counters.clear()
    compiled_args = dataclasses.replace(args, enable_torch_compile=True)
    _, _, runner = build_model_runner(compiled_args)
    assert runner.compiled_with == "inductor_with_freezing"
    linear = runner.dispatch.resolutions["linear.unquantized"]
    assert linear.chosen.name == "torch_native"
    assert any("--enable-torch-compile" in reason for _, reason in linear.rejected)
    # the graphs hold packed copies: the modules' plain linear weights were released
    linears = [m for m in runner.model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.weight.numel() == 0 for m in linears)
    assert runner.model.lm_head.weight.numel() == 0  # untied: the logits graph packed it
    assert runner.model.model.embed_tokens.weight.numel() > 0
    # the build compiled every shape a run meets: prefills, decode batches of 3, 2 and 1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    assert run_scheduler(compiled_args, prompts, runner=runner, max_new_tokens=6)[0] == eager
    assert run_scheduler(compiled_args, prompts[:2], runner=runner,
                         max_new_tokens=9)[0] == ragged
    assert not torch._dynamo.utils.counters["graph_break"], "the model no longer traces whole"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

    catalog = load_plugins()
    block = startup_block(runner.platform, catalog, runner.dispatch, runner)
    assert "torch.compile inductor_with_freezing" in block

    # a second compiled engine of the same class, other weights: the graphs freeze the weights
    # in and skip the guards on modules, so it must keep graphs of its own
    other = cpu_args(build_tiny_model(tmp_path / "other", "llama", seed=12),
                     max_running_requests=4)
    other_eager, _ = run_scheduler(other, prompts[:1], max_new_tokens=6)
    other_compiled, _ = run_scheduler(dataclasses.replace(other, enable_torch_compile=True),
                                      prompts[:1], max_new_tokens=6)
    assert other_compiled == other_eager
    assert other_compiled["r0"] != eager["r0"], "the two models should differ"


def test_eager_engine_keeps_prepacked_weights(model) -> None:
    _, _, runner = build_model_runner(cpu_args(model, max_running_requests=1))
    assert runner.compiled_with == "off"
    assert runner.dispatch.resolutions["linear.unquantized"].chosen.name == "onednn_prepacked"
    packed = [p.is_mkldnn for p in runner.model.parameters() if p.dim() == 2]
    assert any(packed) == (torch.float32 in detect_cpu_features().prepack_dtypes())


def test_without_a_cxx_compiler_the_model_runs_eagerly(model, monkeypatch) -> None:
    import heteroserve.platforms.cpu.compiled as cpu_compiled

    monkeypatch.setattr(cpu_compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    args = dataclasses.replace(cpu_args(model, max_running_requests=1), enable_torch_compile=True)
    _, _, runner = build_model_runner(args)
    assert runner.compiled_with == "off"
    # eager after all: the linears keep the eager engine's packed weights
    assert runner.dispatch.resolutions["linear.unquantized"].chosen.name == "onednn_prepacked"


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler")
def test_compiled_gemma_passes_windows_and_soft_caps_through_the_attention_op(
        tmp_path) -> None:
    """One tiny Gemma 3 with Gemma 2's soft-caps set (the models share one implementation):
    sliding-window and global layers, a rope base per layer type, qk-norm, and attention and
    final logit soft-caps small enough to change the logits. The attention op carries each
    layer's window and cap, and greedy output equals the eager engine's, with no graph
    break."""
    import torch._dynamo.utils

    path = build_tiny_model(tmp_path / "gemma", "gemma3", seed=5, attn_logit_softcapping=10.0,
                            final_logit_softcapping=5.0)
    prompts = [list(range(3, 3 + n)) for n in (9, 17)]
    args = cpu_args(path, max_running_requests=4)
    eager, _ = run_scheduler(args, prompts, max_new_tokens=5)
    torch._dynamo.utils.counters.clear()
    compiled_args = dataclasses.replace(args, enable_torch_compile=True)
    compiled, sched = run_scheduler(compiled_args, prompts, max_new_tokens=5)
    assert compiled == eager
    assert not torch._dynamo.utils.counters["graph_break"]
    model = sched.runner.model
    caps = {layer.self_attn.attn.params.logit_cap for layer in model.model.layers}
    assert caps == {10.0}, caps
    # the tiny Gemmas tie the LM head to the embedding table, which lookups still read
    assert model.lm_head.weight.numel() == model.model.embed_tokens.weight.numel() > 0
