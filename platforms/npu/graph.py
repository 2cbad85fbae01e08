"""NPU graph capture through torch_npu's ``torch.npu.NPUGraph`` (the CUDAGraph-shaped API:
``NPUGraph()``, ``torch.npu.graph(g, stream=...)`` context, ``g.replay()``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.graph import CapturedGraph, GraphRunner


class _NpuGraph(CapturedGraph):
    def __init__(self, graph: Any) -> None:
        self._graph = graph

    def replay(self) -> None:
        self._graph.replay()


class NpuGraphRunner(GraphRunner):
    """Captures ``fn`` into an ``NPUGraph`` on a side stream after ``warmup`` eager runs (the
    warm-up happens on that stream too so the caching allocator's blocks are stream-local).

    ``npu`` is the ``torch.npu`` namespace (passed in so this module imports no vendor code).
    """

    captures = True

    def __init__(self, npu: Any, device: torch.device) -> None:
        self._npu = npu
        self._device = device

    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        npu = self._npu
        stream = npu.Stream(self._device)
        stream.wait_stream(npu.current_stream(self._device))
        with npu.stream(stream):
            for _ in range(warmup):
                fn()
        npu.current_stream(self._device).wait_stream(stream)
        graph = npu.NPUGraph()
        with npu.graph(graph, stream=stream):
            fn()
        return _NpuGraph(graph)
