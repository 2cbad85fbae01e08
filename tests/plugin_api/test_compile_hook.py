"""The Platform compile hook: with ``--enable-torch-compile`` the runner compiles the model
with whatever ``Platform.compile_backend()`` names; the core never knows which."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

import heteroserve.core.model_runner.build as build
from heteroserve.core.config import ServerArgs
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.platforms.cpu.platform import CpuPlatform
from heteroserve.plugin_api import hookimpl

GRAPHS: list[int] = []


def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """A torch.compile backend that runs the captured graph as is, counting graphs."""
    GRAPHS.append(len(gm.graph.nodes))
    return gm.forward


class CompilingCpu(CpuPlatform):
    name = "cpu-compiling"
    priority = -1

    def compile_backend(self) -> Callable[..., Any]:
        return counting_backend


def _logits(model: str, platform: str, compile_: bool) -> torch.Tensor:
    args = ServerArgs(model_path=model, platform=platform, dtype="float32", max_total_tokens=256,
                      max_running_requests=1, enable_torch_compile=compile_)
    _, _, runner = build.build_model_runner(args)
    ids = list(range(3, 23))
    batch = build_forward_batch([SequenceInput(ids, 0, [1, 2])], ForwardMode.EXTEND,
                                runner.page_size, runner.device)
    return runner.forward_eager(batch)


def test_platform_backend_compiles_and_output_is_unchanged(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    @hookimpl
    def heteroserve_platforms() -> list[CpuPlatform]:
        return [CompilingCpu()]

    plugin = types.SimpleNamespace(heteroserve_platforms=heteroserve_platforms,
                                   HETEROSERVE_PLUGIN_API="1.0")
    monkeypatch.setattr(build, "load_plugins", lambda: load_plugins([("compiling", plugin)]))
    model = str(build_tiny_model(tmp_path / "m", "llama", seed=3))
    eager = _logits(model, "cpu", compile_=False)
    assert not GRAPHS
    compiled = _logits(model, "cpu-compiling", compile_=True)
    assert GRAPHS, "the platform's compile backend was never called"
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
