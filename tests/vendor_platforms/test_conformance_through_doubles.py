"""The conformance suite, run on each vendor platform through its documented-semantics double
(quick grid, only the vendor's own implementations: ``-k <vendor>-double``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("vendor", ["npu", "rocm", "xpu", "cuda"])
def test_conformance_suite_passes_on_vendor_double(vendor: str) -> None:
    env = {**os.environ, "HETEROSERVE_TEST_DOUBLES": vendor,
           "PYTHONPATH": os.pathsep.join(
               [str(ROOT / "tests" / "vendor_doubles"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs",
         "heteroserve.conformance", "--platform", f"{vendor}-double", "--conformance-quick",
         "-q", "-k", f"{vendor}-double"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 20, summary
