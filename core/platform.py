"""The Platform contract: one object per device kind, handed to the core by a plugin.

The core never asks which vendor it runs on. Everything it needs from a device (its torch
device type, memory, synchronisation, streams, seeding, collectives, graph capture) goes
through a :class:`Platform`, and everything it may choose between (dtypes, fp8 flavour, KV
page sizes and layouts) is declared here as data in :class:`PlatformCapabilities`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from heteroserve.core.distributed.communicator import Communicator
    from heteroserve.core.graph import GraphRunner


class KVLayout(str, enum.Enum):
    """Memory layout of one layer's paged K (or V) cache tensor.

    ``NHD``: ``[num_pages, page_size, num_kv_heads, head_size]`` (flashinfer's default,
    torch-native, Triton; a ``view(num_pages, page_size, num_kv_heads * head_size)`` of it is
    torch_npu's BSH block layout).
    ``HND``: ``[num_pages, num_kv_heads, page_size, head_size]`` (flashinfer's other layout,
    vLLM-style paged attention kernels).
    ``LATENT``: multi-head latent attention's single cache per layer,
    ``[num_pages, page_size, kv_lora_rank + qk_rope_head_dim]`` (no V tensor; see
    :mod:`heteroserve.core.kernels.mla`).
    """

    NHD = "NHD"
    HND = "HND"
    LATENT = "latent"


class Fp8Flavour(str, enum.Enum):
    """Which 8-bit float the device's matrix units take.

    ``E4M3FN`` (``torch.float8_e4m3fn``, max 448): NVIDIA Hopper+, AMD MI350-class, Intel.
    ``E4M3FNUZ`` (``torch.float8_e4m3fnuz``, max 240): AMD MI300-class.
    """

    E4M3FN = "e4m3fn"
    E4M3FNUZ = "e4m3fnuz"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is Fp8Flavour.E4M3FN else torch.float8_e4m3fnuz


@dataclass(frozen=True)
class Availability:
    """Result of :meth:`Platform.detect`.

    ``available`` is False whenever the platform cannot run here; ``reason`` then says why in
    one line a user can act on (missing package, no device, driver too old). When available,
    ``devices`` names each device found (for example ``"NVIDIA H100 80GB HBM3"``).
    ``simulated``: the platform stands in for its device on another one (a plugin's simulate
    mode); it can be selected by name but never by ``--platform auto``.
    """

    available: bool
    reason: str
    devices: tuple[str, ...] = ()
    simulated: bool = False



class DeviceEvent(Protocol):
    """A device event as torch's stream events behave: ``record()`` on the current stream,
    ``synchronize()`` blocks the host until the work recorded before it is done."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...

@dataclass(frozen=True)
class PlatformCapabilities:
    """What a platform can do, as data the core can reason about without branching on vendor.

    Invariants: ``dtypes`` is non-empty and ordered by preference (the first is the default
    model dtype); ``kv_page_sizes`` is ``None`` when any positive page size works, otherwise the
    exhaustive tuple of page sizes the platform's attention kernels accept, preferred first;
    ``kv_layouts`` is non-empty; ``distributed_backend`` is a ``torch.distributed`` backend name
    (``"gloo"``, ``"nccl"``, ``"hccl"``, ``"xccl"``).
    """

    dtypes: tuple[torch.dtype, ...]
    fp8_flavour: Fp8Flavour | None
    kv_page_sizes: tuple[int, ...] | None
    kv_layouts: tuple[KVLayout, ...]
    graph_capture: bool
    distributed_backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view for ``heteroserve platforms`` and conformance reports."""
        return {
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "fp8_flavour": self.fp8_flavour.value if self.fp8_flavour else None,
            "kv_page_sizes": list(self.kv_page_sizes) if self.kv_page_sizes else "any",
            "kv_layouts": [layout.value for layout in self.kv_layouts],
            "graph_capture": self.graph_capture,
            "distributed_backend": self.distributed_backend,
            **self.extra,
        }


class Platform(ABC):
    """One device kind (cpu, cuda, rocm, xpu, npu, or a vendor's own).

    Subclasses set the class attributes and implement :meth:`detect`, :meth:`capabilities` and
    the device services. A platform object is cheap to build and must not import its vendor
    package at construction: imports happen inside :meth:`detect` and the services, so that
    ``heteroserve platforms`` works on machines without the vendor stack.

    ``priority`` orders ``--platform auto``: the available platform with the highest priority
    wins; two available platforms sharing the top priority is an error naming both.
    """

    name: str
    device_type: str
    priority: int = 0

    @abstractmethod
    def detect(self) -> Availability:
        """Say whether this platform can run here, and why not when it cannot. Never raises."""

    @abstractmethod
    def capabilities(self) -> PlatformCapabilities:
        """Static facts about the platform (may consult the device once it is available)."""

    # -- device services -------------------------------------------------------------------

    def device(self, index: int = 0) -> torch.device:
        """The torch device for local device ``index``."""
        return torch.device(self.device_type, index)

    def set_device(self, index: int) -> None:
        """Make local device ``index`` current for this process (no-op where meaningless)."""

    @abstractmethod
    def memory_info(self, device: torch.device) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` of ``device`` right now."""

    @abstractmethod
    def synchronize(self, device: torch.device | None = None) -> None:
        """Block the host until all queued work on ``device`` (or the current one) is done."""

    def empty_cache(self) -> None:
        """Return cached, unused allocator blocks to the device (no-op where there are none)."""

    def manual_seed(self, seed: int) -> None:
        """Seed every random generator the platform's kernels use."""
        torch.manual_seed(seed)

    def compile_backend(self) -> str | Callable[..., Any] | None:
        """The ``torch.compile`` backend for models on this platform (a registered backend
        name or a backend callable), used only with ``--enable-torch-compile``. Default:
        None, the platform does not compile and models run eagerly."""
        return None

    def compiled_model_ready(self, model: torch.nn.Module) -> None:
        """Called once the runner has compiled every graph it serves (``--enable-torch-compile``,
        after its start-up traces): a backend that copied weights into its graphs may drop
        the model's own copies here. Default: nothing."""

    def runtime_versions(self) -> dict[str, str]:
        """Versions of the device stack beneath torch (driver, runtime, vendor library), for
        conformance reports. Default: none known. Must not raise."""
        return {}

    def new_stream(self, device: torch.device) -> Any | None:
        """A new side stream for overlap, or None where the platform has no streams."""
        return None

    def new_event(self) -> DeviceEvent | None:
        """A new timing/sync event, or None where the platform has no events."""
        return None

    @abstractmethod
    def make_communicator(self, group: Any | None = None) -> Communicator:
        """A :class:`Communicator` over ``group`` (``None``: the default process group)."""

    @abstractmethod
    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        """The graph runner for ``device`` (an eager runner where capture is unsupported)."""

    def __repr__(self) -> str:
        return f"<Platform {self.name} device_type={self.device_type} priority={self.priority}>"
