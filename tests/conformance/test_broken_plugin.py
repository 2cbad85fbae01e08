"""The conformance suite catches broken plugins, honours capabilities and skip_ops, and writes
its report.

An out-of-tree plugin is built on disk (a module plus a ``*.dist-info`` with an
``entry_points.txt`` in group ``heteroserve.platforms``) and put on ``PYTHONPATH`` of a
subprocess running the suite. It registers, for the cpu platform, an ``rms_norm`` that is off
by 1e-2 relative and a ``silu_and_mul`` that leaves one output element unwritten; and a second
platform, ``brokenplat`` (fp32 only, page size 16, ``skip_ops`` for ``fused_moe``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from heteroserve.conformance.provenance import verify_digest

PLUGIN_SOURCE = '''
"""A deliberately broken heteroserve plugin (conformance suite test)."""
import torch

from heteroserve import hookimpl
from heteroserve.core.graph import EagerGraphRunner
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelSpec, Support
from heteroserve.core.platform import Availability, KVLayout, Platform, PlatformCapabilities


def off_by_1e2_rms_norm(x, weight, eps):
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (out * 1.01).to(x.dtype)


def unwritten_silu_and_mul(x):
    half = x.shape[-1] // 2
    full = (torch.nn.functional.silu(x[:, :half].float()) * x[:, half:].float()).to(x.dtype)
    out = torch.empty_like(full)
    out.view(-1)[:-1] = full.reshape(-1)[:-1]  # forgets the last element
    return out


def no_fp16(request):
    if request.dtype == torch.float16:
        return Support.no("the broken kernel takes no fp16")
    return Support.yes()


class BrokenPlatform(Platform):
    name = "brokenplat"
    device_type = "cpu"
    priority = -10

    def detect(self):
        return Availability(True, "always", ("the host CPU",))

    def capabilities(self):
        return PlatformCapabilities(
            dtypes=(torch.float32,), fp8_flavour=None, kv_page_sizes=(16,),
            kv_layouts=(KVLayout.NHD,), graph_capture=False, distributed_backend="gloo")

    def device(self, index=0):
        return torch.device("cpu")

    def memory_info(self, device):
        return (1 << 30, 1 << 31)

    def synchronize(self, device=None):
        pass

    def make_communicator(self, group=None):
        raise NotImplementedError

    def make_graph_runner(self, device):
        return EagerGraphRunner()


@hookimpl
def heteroserve_platforms():
    return [BrokenPlatform()]


@hookimpl
def heteroserve_register_kernels(registry):
    registry.register(KernelSpec(
        op=ops.RMS_NORM, name="broken_rms_norm", load=lambda: off_by_1e2_rms_norm,
        platforms=("cpu",), priority=-500, supports=no_fp16))
    registry.register(KernelSpec(
        op=ops.SILU_AND_MUL, name="broken_unwritten", load=lambda: unwritten_silu_and_mul,
        platforms=("cpu",), priority=-500))


@hookimpl
def heteroserve_conformance_options():
    return {"skip_ops": {"fused_moe": "left to the torch-native fallback"}}
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken_plugin")
    (root / "hs_broken_plugin.py").write_text(PLUGIN_SOURCE)
    info = root / "hs_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hs-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[heteroserve.platforms]\nbroken = hs_broken_plugin\n")
    return root


def _run(plugin: Path, cwd: Path, code_or_args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["op"], r["implementation"]): r for r in report["table"]}


def test_broken_kernels_fail_and_correct_ones_pass(plugin_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _run(plugin_path, tmp_path, [
        "-m", "pytest", "--pyargs", "heteroserve.conformance", "--platform", "cpu",
        "--report", str(out), "-q", "-p", "no:cacheprovider",
        "-k", "(broken or (torch_native and (rms_norm or silu_and_mul))) and not input_contract"])
    log = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, log
    report = json.loads((out / "conformance-cpu.json").read_text())
    rows = _rows(report)
    broken_norm, broken_silu = rows[("rms_norm", "broken_rms_norm")], rows[
        ("silu_and_mul", "broken_unwritten")]
    assert broken_norm["failed"] > 0 and broken_norm["kind"] == "native", broken_norm
    assert broken_norm["max_rel_err"] > 5e-3, broken_norm
    assert broken_silu["failed"] > 0 and broken_silu["passed"] == 0, broken_silu
    assert any("NaN" in f["message"] for f in report["failures"]
               if f["implementation"] == "broken_unwritten"), report["failures"]
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"):
        good = rows[(op, "torch_native")]
        assert good["failed"] == 0 and good["passed"] > 0, good
    assert len(report["passes"]) == sum(r["passed"] for r in report["table"])
    assert any("torch_native" in t and "rms_norm" in t for t in report["passes"])
    assert not any("broken_unwritten" in t for t in report["passes"])
    # the implementation's own refusal (no fp16) is a listed skip, not a silent drop
    assert broken_norm["skipped"] > 0
    assert any("takes no fp16" in s["reason"] for s in report["skips"])
    md = (out / "conformance-cpu.md").read_text()
    assert "| op | implementation | kind |" in md
    assert "| rms_norm | broken_rms_norm | native |" in md
    assert "## Failures" in md and "## Skipped" in md and "takes no fp16" in md
    assert report["platform"] == "cpu" and report["torch_version"] and report["date"]
    assert report["devices"] and "--platform" in report["pytest_args"]
    # tiers, provenance and the report's digest of itself
    assert report["tiers"]["correct"]["status"] == "failed" and report["tier_reached"] == "none"
    assert report["selection"]["deselected"] > 0 and not report["selection"]["complete"]
    plugins = {p["distribution"]: p for p in report["provenance"]["plugins"]}
    assert plugins["hs-broken-plugin"]["version"] == "0.1", plugins
    assert report["provenance"]["torch"]["version"] == report["torch_version"]
    assert verify_digest(report)
    assert not verify_digest({**report, "platform": "tampered"})
    assert "- tier reached: **none** (partial run" in md
    # claims probing: the refused fp16 cases were run anyway, and failing, confirm the refusal
    probes = [p for p in report["claims"] if p["implementation"] == "broken_rms_norm"]
    assert probes and {p["verdict"] for p in probes} == {"refusal confirmed"}, probes
    assert all("takes no fp16" in p["refusal"] for p in probes)
    assert "## Claims probing (informational)" in md


def test_capabilities_and_skip_ops_are_reported(plugin_path: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        from heteroserve.conformance.runner import run_conformance
        raise SystemExit(run_conformance("brokenplat", {str(tmp_path / 'r')!r}, [
            "-q", "--conformance-quick", "-k", "rms_norm or fused_moe or attention_write_kv"]))
    """)
    proc = _run(plugin_path, tmp_path, ["-c", code])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "conformance-brokenplat.json").read_text())
    reasons = [s["reason"] for s in report["skips"]]
    assert any("does not declare dtype bf16" in r for r in reasons), reasons
    assert any("does not declare KV page size 1" in r for r in reasons), reasons
    assert any("left to the torch-native fallback" in r for r in reasons), reasons
    assert report["skip_ops"] == {"fused_moe": "left to the torch-native fallback"}
    rows = _rows(report)
    assert rows[("fused_moe", "torch_native")]["passed"] == 0
    assert rows[("fused_moe", "torch_native")]["skipped"] > 0
    assert rows[("rms_norm", "torch_native")]["kind"] == "fallback"
    assert rows[("rms_norm", "torch_native")]["passed"] > 0
    assert ("rms_norm", "broken_rms_norm") not in rows  # registered for cpu only


def test_unknown_platform_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run(tmp_path, tmp_path, ["-m", "pytest", "--pyargs", "heteroserve.conformance",
                                     "--platform", "nosuchplatform", "-q"])
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "unknown platform 'nosuchplatform'" in proc.stderr
    assert "Traceback" not in proc.stderr
