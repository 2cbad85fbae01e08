"""HIP graph capture through the ``torch.cuda.CUDAGraph`` API of ROCm builds of torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.graph import CapturedGraph, GraphRunner


class _HipGraph(CapturedGraph):
    def __init__(self, graph: Any) -> None:
        self._graph = graph

    def replay(self) -> None:
        self._graph.replay()


class HipGraphRunner(GraphRunner):
    """Warm ``fn`` up on a side stream, then record it into a ``torch.cuda.CUDAGraph`` (a HIP
    graph on ROCm). The side stream keeps the warm-up's allocations in the graph's pool."""

    captures = True

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(self._device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        return _HipGraph(graph)
