"""Programmatic dependent launch is requested only where it can work: never off CUDA, never
when switched off, and the USE_PDL constexpr always travels with Triton's launch_pdl."""

from __future__ import annotations

import pytest
import torch

from heteroserve.platforms.triton import pdl


@pytest.fixture(autouse=True)
def _fresh_cache():
    pdl.pdl_enabled.cache_clear()
    yield
    pdl.pdl_enabled.cache_clear()


def test_off_cuda_no_pdl() -> None:
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.pdl_args(torch.device("cpu")) == {"USE_PDL": False}


def test_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETEROSERVE_TRITON_PDL", "0")
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"USE_PDL": False}


def test_constexpr_and_launch_option_travel_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device: True)
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"USE_PDL": True, "launch_pdl": True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decision_matches_capability() -> None:
    dev = torch.device("cuda", 0)
    hopper = torch.cuda.get_device_capability(0)[0] >= 9 and torch.version.cuda is not None
    if not hopper:
        assert not pdl.pdl_enabled(dev)
