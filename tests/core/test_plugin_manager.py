"""Plugin discovery through pluggy: failures are reported, selection rules hold."""

from __future__ import annotations

import types

import pytest
import torch

from heteroserve import hookimpl
from heteroserve.core.graph import EagerGraphRunner
from heteroserve.core.kernels.registry import ANY_PLATFORM, KernelSpec
from heteroserve.core.platform import (
    Availability, KVLayout, Platform, PlatformCapabilities,
)
from heteroserve.core.plugins.manager import PlatformSelectionError, load_plugins


class _FakePlatform(Platform):
    device_type = "cpu"

    def __init__(self, name: str, priority: int, available: bool = True) -> None:
        self.name, self.priority, self._available = name, priority, available

    def detect(self) -> Availability:
        return Availability(self._available, "ok" if self._available else f"{self.name} missing")

    def capabilities(self) -> PlatformCapabilities:
        return PlatformCapabilities((torch.float32,), None, None, (KVLayout.NHD,), False, "gloo")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return (1, 1)

    def synchronize(self, device: torch.device | None = None) -> None:
        pass

    def make_communicator(self, group: object | None = None):  # pragma: no cover - unused
        raise NotImplementedError

    def make_graph_runner(self, device: torch.device) -> EagerGraphRunner:
        return EagerGraphRunner()


def _plugin(*platforms: Platform, kernels: tuple[KernelSpec, ...] = ()) -> types.SimpleNamespace:
    @hookimpl
    def heteroserve_platforms() -> list[Platform]:
        return list(platforms)

    @hookimpl
    def heteroserve_register_kernels(registry) -> None:
        for spec in kernels:
            registry.register(spec)

    return types.SimpleNamespace(heteroserve_platforms=heteroserve_platforms,
                                 heteroserve_register_kernels=heteroserve_register_kernels)


def test_builtin_cpu_platform_loads_through_entry_points() -> None:
    catalog = load_plugins()
    assert "cpu" in catalog.platforms
    assert catalog.platforms["cpu"].source == "heteroserve"
    assert catalog.select("cpu").name == "cpu"
    assert catalog.registry.implementations("rms_norm")


def test_misspelled_hook_is_rejected_and_others_keep_working() -> None:
    @hookimpl
    def heteroserve_platfroms() -> list[Platform]:  # misspelled on purpose
        return []

    bad = types.SimpleNamespace(heteroserve_platfroms=heteroserve_platfroms)
    good = _plugin(_FakePlatform("good", 1))
    catalog = load_plugins([("typo", bad), ("good", good)], use_entry_points=False)
    assert [f.plugin for f in catalog.failures] == ["typo"]
    assert "heteroserve_platfroms" in catalog.failures[0].error
    assert "good" in catalog.platforms


def test_plugin_raising_is_reported_with_its_error() -> None:
    @hookimpl
    def heteroserve_platforms() -> list[Platform]:
        raise RuntimeError("driver exploded")

    boom = types.SimpleNamespace(heteroserve_platforms=heteroserve_platforms)
    catalog = load_plugins([("boom", boom), ("good", _plugin(_FakePlatform("good", 1)))],
                           use_entry_points=False)
    assert catalog.failures[0].plugin == "boom"
    assert "driver exploded" in catalog.failures[0].error
    assert catalog.select("auto").name == "good"


def test_duplicate_kernel_rejects_whole_plugin() -> None:
    spec = KernelSpec(op="rms_norm", name="same", load=lambda: None, platforms=(ANY_PLATFORM,))
    first = _plugin(_FakePlatform("a", 1), kernels=(spec,))
    second = _plugin(_FakePlatform("b", 2), kernels=(spec,))
    catalog = load_plugins([("first", first), ("second", second)], use_entry_points=False)
    assert "b" not in catalog.platforms
    assert catalog.failures and catalog.failures[0].plugin == "second"
    assert catalog.registry.implementations("rms_norm")[0].provider == "in-process"


def test_auto_picks_highest_priority_available() -> None:
    catalog = load_plugins([("p", _plugin(_FakePlatform("low", 1), _FakePlatform("high", 5),
                                          _FakePlatform("absent", 9, available=False)))],
                           use_entry_points=False)
    assert catalog.select("auto").name == "high"


def test_auto_tie_is_an_error_naming_both() -> None:
    catalog = load_plugins([("p", _plugin(_FakePlatform("x", 3), _FakePlatform("y", 3)))],
                           use_entry_points=False)
    with pytest.raises(PlatformSelectionError, match="x and y"):
        catalog.select("auto")


def test_unknown_and_unavailable_platform_errors_are_one_line_naming_the_choices() -> None:
    """An unknown name: every platform's name and the available ones; an unavailable one:
    its reason and the available ones. One line each (the CLI prints it as it is)."""
    catalog = load_plugins([("p", _plugin(_FakePlatform("ok", 1),
                                          _FakePlatform("gone", 2, available=False)))],
                           use_entry_points=False)
    with pytest.raises(PlatformSelectionError) as unknown:
        catalog.select("nope")
    assert "known: gone, ok (available here: ok;" in str(unknown.value)
    with pytest.raises(PlatformSelectionError) as unavailable:
        catalog.select("gone")
    assert str(unavailable.value) == ("platform 'gone' is unavailable: gone missing "
                                      "(available here: ok)")
    assert "\n" not in str(unknown.value) + str(unavailable.value)
