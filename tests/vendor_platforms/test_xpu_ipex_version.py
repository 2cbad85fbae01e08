"""The xpu platform stands on torch.xpu alone: IPEX is optional, checked by version at
detection, and no extra installs it (it pins one torch release)."""

from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from heteroserve.platforms.xpu.platform import IPEX_MODULE, ipex_missing

REPO = Path(__file__).resolve().parents[2]


def _fake_ipex(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    module = types.ModuleType(IPEX_MODULE)
    module.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, IPEX_MODULE, module)


def test_ipex_built_for_another_torch_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_ipex(monkeypatch, "2.8.10+xpu")
    if torch.__version__.startswith("2.8."):
        pytest.skip("this torch is 2.8: IPEX 2.8 matches it")
    reason = ipex_missing()
    assert reason is not None and "intel-extension-for-pytorch 2.8.10+xpu is built for torch 2.8" \
        in reason and torch.__version__ in reason


def test_ipex_matching_this_torch_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    _fake_ipex(monkeypatch, f"{major_minor}.0+xpu")
    assert ipex_missing() is None


def test_no_extra_installs_ipex() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    pulling = [name for name, reqs in extras.items()
               if any(r.lower().startswith("intel-extension-for-pytorch") for r in reqs)]
    assert not pulling, f"extras {pulling} would install IPEX beside another torch"
    assert "pytest>=8" in extras["conformance"]
