"""XPU graph capture through ``torch.xpu.XPUGraph`` (recent torch; the CUDAGraph-shaped API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.graph import CapturedGraph, GraphRunner


class _XpuGraph(CapturedGraph):
    def __init__(self, graph: Any) -> None:
        self._graph = graph

    def replay(self) -> None:
        self._graph.replay()


class XpuGraphRunner(GraphRunner):
    """Warm ``fn`` up on a side stream, then record it into a ``torch.xpu.XPUGraph``. The
    side stream keeps the warm-up's allocations in the graph's pool."""

    captures = True

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        stream = torch.xpu.Stream(self._device)
        stream.wait_stream(torch.xpu.current_stream(self._device))
        with torch.xpu.stream(stream):
            for _ in range(warmup):
                fn()
        torch.xpu.current_stream(self._device).wait_stream(stream)
        graph = torch.xpu.XPUGraph()
        with torch.xpu.graph(graph, stream=stream):
            fn()
        return _XpuGraph(graph)
