"""``benchmarks/flashinfer_jit_warmup.py`` covers every flashinfer module the conformance grid
needs: one per (prefill or decode, dtype, head size, window?, cap?), found through the
cuda-double platform (the real cuda kernel specs, flashinfer replaced by its double).

Also: the warm-up builds each module through its own ``spec.build()``, a few at a time, with
the job budget split between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from flashinfer_jit_warmup import build_each  # noqa: E402

SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
from flashinfer_jit_warmup import variants
both = variants("cuda-double", ["extend", "decode"], None)
llama = variants("cuda-double", ["extend", "decode"], "bf16-p1-h8:2-d128")
plain = variants("cuda-double", ["extend"], None, ("sw", "cap"))
print(json.dumps({"both": [[str(x) for x in k] + [v] for k, v in both.items()],
                  "llama": [[str(x) for x in k] for k in llama],
                  "plain": [[str(x) for x in k] for k in plain]}))
"""


def test_warmup_variants_cover_the_flashinfer_grid() -> None:
    env = {**os.environ, "HETEROSERVE_TEST_DOUBLES": "cuda",
           "PYTHONPATH": os.pathsep.join(
               [str(ROOT / "tests" / "vendor_doubles"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    rows = data["both"]
    modules = {tuple(r[:5]) for r in rows}
    assert len(modules) == len(rows) == 28, rows  # 7 option sets x 2 dtypes x prefill/decode
    assert {r[0] for r in rows} == {"prefill", "decode"}
    assert {r[1] for r in rows} == {"torch.bfloat16", "torch.float16"}  # no fp32 module
    assert {r[2] for r in rows} == {"64", "128", "256"}
    # the window + cap case of the grid maps to a module with both switched on
    assert ["prefill", "torch.bfloat16", "128", "True", "True"] in [r[:5] for r in rows]
    assert all(r[5].startswith("extend:") == (r[0] == "prefill") for r in rows)
    # what a Llama-8B engine needs: the plain bf16 head-128 prefill and decode modules
    assert sorted(data["llama"]) == [
        ["decode", "torch.bfloat16", "128", "False", "False"],
        ["prefill", "torch.bfloat16", "128", "False", "False"]]
    # --exclude sw --exclude cap: the six plain prefill modules (3 head sizes x 2 dtypes)
    assert len(data["plain"]) == 6
    assert all(r[0] == "prefill" and r[3:] == ["False", "False"] for r in data["plain"])


class FakeSpec:
    """A JitSpec stand-in: ``build()`` records MAX_JOBS and how many builds overlap."""

    lock = threading.Lock()
    running = 0
    peak = 0

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.jobs = name, fail, ""

    def build(self) -> None:
        with FakeSpec.lock:
            FakeSpec.running += 1
            FakeSpec.peak = max(FakeSpec.peak, FakeSpec.running)
        self.jobs = os.environ["MAX_JOBS"]
        time.sleep(0.05)
        with FakeSpec.lock:
            FakeSpec.running -= 1
        if self.fail:
            raise RuntimeError(f"ninja failed for {self.name}")


def test_build_each_builds_every_module_with_a_share_of_the_jobs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_JOBS", "")
    FakeSpec.peak = 0
    specs = [FakeSpec(f"m{i}") for i in range(5)]
    seconds = build_each(specs, jobs=16, at_once=2)
    assert sorted(seconds) == [s.name for s in specs]
    assert {s.jobs for s in specs} == {"8"}
    assert FakeSpec.peak == 2


def test_build_each_raises_a_failed_build_after_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_JOBS", "")
    specs = [FakeSpec("bad", fail=True), FakeSpec("good")]
    with pytest.raises(RuntimeError, match="ninja failed for bad"):
        build_each(specs, jobs=3, at_once=2)
    assert specs[1].jobs == "1"
