"""``benchmarks/flashinfer_jit_warmup.py`` covers every flashinfer module the conformance grid
needs: one per (prefill or decode, dtype, head size, window?, cap?), found through the
cuda-double platform (the real cuda kernel specs, flashinfer replaced by its double)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
from flashinfer_jit_warmup import variants
both = variants("cuda-double", ["extend", "decode"], None)
llama = variants("cuda-double", ["extend", "decode"], "bf16-p1-h8:2-d128")
print(json.dumps({"both": [[str(x) for x in k] + [v] for k, v in both.items()],
                  "llama": [[str(x) for x in k] for k in llama]}))
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
