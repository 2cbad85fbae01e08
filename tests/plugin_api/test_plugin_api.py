"""heteroserve.plugin_api: one module for plugins, versioned, and the loader enforces it."""

from __future__ import annotations

import ast
import types
import warnings
from pathlib import Path

import pytest
import torch

import heteroserve.plugin_api as api
from heteroserve.core.plugins.manager import PlatformSelectionError, load_plugins

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = sorted((REPO / "plugins").glob("*/src/**/*.py"))


def _heteroserve_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "heteroserve"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "heteroserve":
            found.append(node.module)
    return found


def test_template_and_example_import_only_the_plugin_api() -> None:
    assert {p.parts[-4] for p in PLUGIN_SOURCES} >= {"template", "example"}
    bad = {str(p.relative_to(REPO)): mods for p in PLUGIN_SOURCES
           if (mods := [m for m in _heteroserve_imports(p) if m != "heteroserve.plugin_api"])}
    assert not bad, f"plugins must import heteroserve.plugin_api only: {bad}"
    declared = [p for p in PLUGIN_SOURCES if "HETEROSERVE_PLUGIN_API" in p.read_text()]
    assert len(declared) == 2, "the template and the example each declare their API version"


def test_every_exported_name_resolves() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    assert api.ApiVersion.parse(api.PLUGIN_API_VERSION).major >= 1
    assert callable(api.torch_native(api.RMS_NORM))
    with pytest.raises(KeyError, match="no torch-native implementation of op 'nope'"):
        api.torch_native("nope")


class _SimPlatform(api.Platform):
    device_type = "cpu"

    def __init__(self, name: str, priority: int, simulated: bool = False) -> None:
        self.name, self.priority, self._simulated = name, priority, simulated

    def detect(self) -> api.Availability:
        return api.Availability(True, "here", (), simulated=self._simulated)

    def capabilities(self) -> api.PlatformCapabilities:
        return api.PlatformCapabilities((torch.float32,), None, None, (api.KVLayout.NHD,),
                                        False, "gloo")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return (1, 1)

    def synchronize(self, device: torch.device | None = None) -> None:
        pass

    def make_communicator(self, group: object | None = None) -> api.Communicator:
        return api.TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> api.GraphRunner:
        return api.EagerGraphRunner()


def _plugin(platform: api.Platform, declared: str | None) -> types.SimpleNamespace:
    @api.hookimpl
    def heteroserve_platforms() -> list[api.Platform]:
        return [platform]

    ns = types.SimpleNamespace(heteroserve_platforms=heteroserve_platforms)
    if declared is not None:
        ns.HETEROSERVE_PLUGIN_API = declared
    return ns


@pytest.mark.parametrize("declared", ["2.0", "0.9", "1.99", "one"])
def test_incompatible_plugin_is_refused_by_name_and_others_keep_working(declared: str) -> None:
    catalog = load_plugins([("future_vendor", _plugin(_SimPlatform("future", 5), declared)),
                            ("good", _plugin(_SimPlatform("good", 1), "1.0"))],
                           use_entry_points=False)
    assert "future" not in catalog.platforms and "good" in catalog.platforms
    [failure] = catalog.failures
    assert failure.plugin == "future_vendor" and "\n" not in failure.error
    assert "future_vendor" in failure.error
    if declared != "one":
        assert f"wants plugin API {declared}" in failure.error
        assert f"offers {api.PLUGIN_API_VERSION}" in failure.error
    assert catalog.select("auto").name == "good"


def test_compatible_and_undeclared_plugins_load() -> None:
    catalog = load_plugins([("same", _plugin(_SimPlatform("a", 1), "1.0")),
                            ("patch", _plugin(_SimPlatform("b", 2), "1.0.7")),
                            ("old", _plugin(_SimPlatform("c", 3), None))],
                           use_entry_points=False)
    assert not catalog.failures and set(catalog.platforms) == {"a", "b", "c"}
    assert len(catalog.notes) == 1 and "old declares no HETEROSERVE_PLUGIN_API" in catalog.notes[0]


def test_deprecated_name_warns_then_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(api._DEPRECATED, "OldSupport", ("Support", "1.2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert api.OldSupport is api.Support
    assert any(issubclass(w.category, DeprecationWarning) and "removed in plugin API 1.2"
               in str(w.message) for w in caught)


def test_simulated_platform_is_never_the_auto_default() -> None:
    catalog = load_plugins([("sim", _plugin(_SimPlatform("sim", 1000, simulated=True), "1.0")),
                            ("real", _plugin(_SimPlatform("real", 0), "1.0"))],
                           use_entry_points=False)
    assert catalog.select("auto").name == "real"
    assert catalog.select("sim").name == "sim"
    only = load_plugins([("sim", _plugin(_SimPlatform("sim", 1000, simulated=True), "1.0"))],
                        use_entry_points=False)
    with pytest.raises(PlatformSelectionError, match="simulated"):
        only.select("auto")
