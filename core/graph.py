"""The GraphRunner contract: capture a device computation once, replay it cheaply.

The engine captures its decode step per batch size at start-up when the platform can
(CUDA/HIP graphs, NPU graphs) and replays it each step. Platforms without capture use
:class:`EagerGraphRunner`, whose replay simply calls the function again, so the engine has
one code path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any


class CapturedGraph(ABC):
    """A recorded computation over fixed ("static") input and output buffers."""

    @abstractmethod
    def replay(self) -> None:
        """Run the recorded work again. It reads the static inputs as they are now and writes
        the same static outputs the captured function wrote."""


class GraphRunner(ABC):
    """Captures functions whose every input and output is a pre-allocated device buffer.

    Contract for ``fn``: it takes no arguments, reads only tensors that outlive the capture,
    writes its results into tensors that outlive the capture, performs no host-device
    synchronisation and allocates no tensor whose address it needs afterwards. Replaying the
    returned graph after changing the inputs' values must equal calling ``fn`` again (the
    conformance suite checks graph replay equal to eager).
    """

    #: True when replay avoids per-kernel launch overhead (a real device graph).
    captures: bool = False

    @abstractmethod
    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        """Run ``fn`` ``warmup`` times eagerly, then record it and return the graph."""


class _EagerGraph(CapturedGraph):
    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn

    def replay(self) -> None:
        self._fn()


class EagerGraphRunner(GraphRunner):
    """No capture: replay calls the function. Correct on every device, and the baseline that
    the conformance suite compares real graph runners against."""

    captures = False

    def capture(self, fn: Callable[[], Any], *, warmup: int = 1) -> CapturedGraph:
        for _ in range(warmup):
            fn()
        return _EagerGraph(fn)
