"""The plugin template in simulate mode: loads from its source folder (no package index),
runs on the host CPU with torch-native kernels, passes conformance, and is never the auto
default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_SRC = REPO / "plugins/template/src"


@pytest.fixture(scope="module")
def template_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose dist-info points the ``heteroserve.platforms`` entry point at the
    template's plugin module (the template source goes on PYTHONPATH beside it)."""
    root = tmp_path_factory.mktemp("template")
    info = root / "heteroserve_myvendor-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: heteroserve-myvendor\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[heteroserve.platforms]\nmyvendor = heteroserve_myvendor.plugin\n")
    return root


def _run(template: Path, cwd: Path, args: list[str], simulate: bool = True
         ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(template), str(TEMPLATE_SRC),
                                                      env.get("PYTHONPATH")]))
    env.pop("HETEROSERVE_MYVENDOR_SIMULATE", None)
    if simulate:
        env["HETEROSERVE_MYVENDOR_SIMULATE"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


SELECT = """
from heteroserve.core.plugins.manager import load_plugins
c = load_plugins()
entry = c.platforms["myvendor"]
print(entry.availability.available, entry.availability.simulated, c.select("auto").name,
      [f.plugin for f in c.failures])
"""


def test_simulated_template_is_available_but_never_auto(template_path: Path,
                                                        tmp_path: Path) -> None:
    sim = _run(template_path, tmp_path, ["-c", SELECT])
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert sim.stdout.split()[:3] == ["True", "True", "cpu"], sim.stdout
    real = _run(template_path, tmp_path, ["-c", SELECT], simulate=False)
    assert real.stdout.split()[:3] == ["False", "False", "cpu"], real.stdout + real.stderr


def test_simulated_template_passes_conformance(template_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _run(template_path, tmp_path, [
        "-m", "pytest", "--pyargs", "heteroserve.conformance", "--platform", "myvendor",
        "--conformance-quick", "--report", str(out), "-q", "-p", "no:cacheprovider",
        "-k", "test_rms_norm or test_input_contract"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((out / "conformance-myvendor.json").read_text())
    rows = {(r["op"], r["implementation"]): r for r in report["table"]}
    mine = rows[("rms_norm", "myvendor")]
    assert mine["passed"] > 0 and mine["failed"] == 0 and mine["kind"] == "native", mine
    assert report["tier_reached"] == "correct"
    assert report["devices"] == ["host CPU (simulated myvendor)"]
    # it refuses fp32, yet its (torch-native) kernel computes fp32 right: claims probing says so
    unclaimed = [p for p in report["claims"] if p["implementation"] == "myvendor"]
    assert unclaimed and all(p["verdict"] == "supported but unclaimed" for p in unclaimed)
    assert all("bf16/fp16 only" in p["refusal"] for p in unclaimed)
