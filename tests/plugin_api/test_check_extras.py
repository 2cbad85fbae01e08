"""The CI check that every extra resolves to a working set (.ci/check_extras.py): its rules
on a resolved set, and a machine without PyPI skips in one line (the resolution itself
runs in CI, where PyPI is reachable)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci/check_extras.py"


@pytest.fixture(scope="module")
def ce():
    spec = importlib.util.spec_from_file_location("check_extras", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_extras"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["check_extras"]


def _problems(ce, extra: str, **versions: str) -> list[str]:
    got = {k.replace("_", "-"): v for k, v in versions.items()}
    return ce._problems(ce.Resolution(extra, got), "torch>=2.4")


def test_rules_on_resolved_sets(ce) -> None:
    assert _problems(ce, "xpu", torch="2.15.0", triton="3.9.0") == []
    ipex = _problems(ce, "xpu", torch="2.15.0", intel_extension_for_pytorch="2.8.0")
    assert ipex[0].startswith("intel-extension-for-pytorch 2.8.0 is in the set")
    assert ipex[1] == ("intel-extension-for-pytorch 2.8.0 is built for torch 2.8, the set has "
                       "torch 2.15.0")
    assert _problems(ce, "npu", torch="2.14.0", torch_npu="2.14.0") == []
    assert _problems(ce, "npu", torch="2.15.0", torch_npu="2.14.0.post1") == [
        "torch-npu 2.14.0.post1 is built for torch 2.14, the set has torch 2.15.0"]
    assert _problems(ce, "npu", torch="2.15.0") == ["torch-npu missing from the set"]
    assert _problems(ce, "cuda", torch="2.15.0", triton="3.9.0") == [
        "flashinfer-python missing from the set"]
    assert _problems(ce, "cpu", torch="2.3.1") == [
        "torch 2.3.1 is below the core requirement torch>=2.4"]
    assert _problems(ce, "cpu", numpy="2.0") == ["no torch in the set"]
    conflict = ce._problems(ce.Resolution("npu", {}, "ResolutionImpossible"), "torch>=2.4")
    assert conflict == ["does not resolve: ResolutionImpossible"]


def test_every_extra_of_pyproject_has_its_vendor_rules(ce) -> None:
    import tomllib

    extras = tomllib.loads((SCRIPT.parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert {"cuda", "rocm", "xpu", "npu"} <= set(extras) and set(ce.RULES) <= set(extras)
    assert not any("intel-extension-for-pytorch" in r for r in extras["xpu"])


def test_no_route_to_pypi_is_a_one_line_skip(ce, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ce, "_online", lambda: "URLError: [Errno -3] name resolution failed")
    assert ce.main([]) == 0
    out = capsys.readouterr().out
    assert out == ("SKIP extras resolution: no route to PyPI from this machine (URLError: "
                   "[Errno -3] name resolution failed)\n")
    assert ce.main(["nope"]) == 2
