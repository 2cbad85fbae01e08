"""CUDA graph capture through ``torch.cuda.CUDAGraph``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.graph import CapturedGraph, GraphRunner


class _CudaGraph(CapturedGraph):
    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self._graph = graph

    def replay(self) -> None:
        self._graph.replay()


class CudaGraphRunner(GraphRunner):
    """Warm ``fn`` up on a side stream (so Triton/JIT compilation and lazy allocations happen
    outside capture), then record it into a ``torch.cuda.CUDAGraph``. Every graph of one
    runner shares one memory pool, as SGLang does for its per-batch-size decode graphs:
    capture the largest batch first and the smaller ones reuse its blocks."""

    captures = True

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._pool: Any | None = None

    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        with torch.cuda.device(self._device):
            stream = torch.cuda.Stream(self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(self._device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                fn()
            torch.cuda.current_stream(self._device).wait_stream(stream)
        return _CudaGraph(graph)
