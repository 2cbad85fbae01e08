"""The CPU platform: always available, gloo for collectives, no graph capture."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import EagerGraphRunner, GraphRunner
from heteroserve.core.platform import (
    Availability, Fp8Flavour, KVLayout, Platform, PlatformCapabilities,
)
from heteroserve.platforms.cpu.features import detect_cpu_features

if TYPE_CHECKING:
    from heteroserve.platforms.cpu.compiled import InductorWithFreezing

logger = logging.getLogger(__name__)


def _host_memory() -> tuple[int, int]:
    """``(available, total)`` bytes of host memory from /proc/meminfo, else from sysconf."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // 2, total


class CpuPlatform(Platform):
    """Runs everything with torch-native kernels on the host CPU."""

    name = "cpu"
    device_type = "cpu"
    priority = 0
    #: the backend :meth:`compile_backend` made last (None before any)
    _compiler: InductorWithFreezing | None = None

    def detect(self) -> Availability:
        isa = detect_cpu_features().describe()["matmul_units"]
        return Availability(True, "the host CPU is always available",
                            (f"{os.cpu_count()} CPU cores, {isa}",))

    def capabilities(self) -> PlatformCapabilities:
        return PlatformCapabilities(
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            fp8_flavour=Fp8Flavour.E4M3FN,
            kv_page_sizes=None,
            kv_layouts=(KVLayout.NHD, KVLayout.HND),
            graph_capture=False,
            distributed_backend="gloo",
            # host memory is shared with everything else: cap the KV pool (--max-total-tokens
            # still lowers it)
            # isa, matmul units, oneDNN prepack dtypes: shown in the start-up block
            extra={"kv_cache_max_bytes": 4 << 30, **detect_cpu_features().describe()},
        )

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return _host_memory()

    def synchronize(self, device: torch.device | None = None) -> None:
        """CPU kernels run synchronously; nothing to wait for."""

    def make_communicator(self, group: object | None = None) -> Communicator:
        from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def compile_backend(self) -> Callable[..., Any] | None:
        """Inductor with freezing (:mod:`.compiled`), used with ``--enable-torch-compile``;
        None (the model runs eagerly, with a warning) where no C++ compiler is on the path:
        inductor builds its CPU kernels with one.

        Turns on ``torch._inductor.config.freezing`` for the process: dynamo reads it while
        tracing (to keep the weights as graph constants), before any backend is called. It
        affects only graphs traced without autograd, which an engine's forward always is.
        Also turns off duck sizing, which would tie the token count of the tracing step to
        any other dimension of the same size (a 16-token trace to a page size of 16). Each
        call makes a new backend object, for one engine's compiled model."""
        from heteroserve.platforms.cpu.compiled import cxx_compiler

        if cxx_compiler() is None:
            logger.warning("--enable-torch-compile on cpu needs a C++ compiler (g++, clang++ "
                           "or $CXX) for inductor's kernels; none found, the model runs eagerly")
            return None
        import torch._inductor.config
        import torch.fx.experimental._config

        from heteroserve.platforms.cpu.compiled import InductorWithFreezing

        self._compiler = InductorWithFreezing()
        torch._inductor.config.freezing = True
        torch.fx.experimental._config.use_duck_shape = False
        return self._compiler

    def compiled_model_ready(self, model: torch.nn.Module) -> None:
        """Drop the plain weights the compiled graphs hold packed copies of
        (:meth:`~heteroserve.platforms.cpu.compiled.InductorWithFreezing.release_traced_weights`
        of the backend :meth:`compile_backend` made last)."""
        compiler = self._compiler
        released = compiler.release_traced_weights(model) if compiler is not None else 0
        if released:
            logger.info("released %.1f MiB of plain linear weights (the compiled graphs hold "
                        "packed copies)", released / 2**20)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        return EagerGraphRunner()
