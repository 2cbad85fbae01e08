"""Fixtures for the rocm/xpu/npu adapter tests: the vendor doubles, installed per test."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

DOUBLES_DIR = Path(__file__).resolve().parents[1] / "vendor_doubles"
if str(DOUBLES_DIR) not in sys.path:
    sys.path.insert(0, str(DOUBLES_DIR))

from heteroserve_vendor_doubles import installed  # noqa: E402


@pytest.fixture
def torch_npu_double() -> Iterator[ModuleType]:
    with installed("npu") as module:
        yield module


@pytest.fixture
def aiter_double() -> Iterator[ModuleType]:
    with installed("rocm") as module:
        yield module


@pytest.fixture
def ipex_double() -> Iterator[ModuleType]:
    with installed("xpu") as module:
        yield module


@pytest.fixture
def flashinfer_double() -> Iterator[ModuleType]:
    with installed("cuda") as module:
        yield module
