"""The conformance suite catches faults injected into a kernel it certifies.

Mutants of the example plugin's split-KV decode kernel (plugins/example) are generated from
its source text, one edit each, and packaged as one out-of-tree plugin that registers every
mutant (and the unmutated kernel, as a control) as a cpu attention implementation. One
conformance run over three of their decode cases must fail every mutant and pass the
control.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "plugins/example/src/heteroserve_example_splitkv/splitkv.py"

#: mutant -> (text in the kernel's source, its replacement, how many times the text occurs)
MUTANTS: dict[str, tuple[str, str, int]] = {
    "off_by_one_key": ("valid = pos < length", "valid = pos <= length", 1),
    "scale_0p1_percent": ("kf) * layer.scale", "kf) * (layer.scale * 1.001)", 1),
    "window_off_by_one": ("(pos > length - 1 - layer.sliding_window)",
                          "(pos >= length - 1 - layer.sliding_window)", 1),
    "dropped_soft_cap": ("scores = layer.logit_cap * torch.tanh(scores / layer.logit_cap)",
                         "scores = scores", 1),
    "wrong_gqa_mapping": (".repeat_interleave(group, dim=1)", ".repeat(1, group, 1)", 2),
    "mixed_batch_rows": ("self._split_kv_one(q[b],", "self._split_kv_one(q[(b + 1) % len(q)],",
                         1),
    "one_page_read": ("(pages[:, None] * page", "(pages[:1, None] * page", 1),
    "non_deterministic": ("return merged.to(q.dtype)",
                          "return (merged + 1e-7 * torch.rand_like(merged)).to(q.dtype)", 1),
    "dropped_rescale": ("rescale = torch.exp(chunk_max - global_max)",
                        "rescale = torch.ones_like(chunk_max)", 1),
}

#: the decode cases run (fp32: the tightest tolerance and a bitwise determinism check): GQA 8
#: with head size 64, one sliding-window case and one soft-cap case; the full grid catches
#: every mutant too, this keeps the test to seconds
SELECTION = "mutant_ and attention_decode and fp32 and ((h16 and d64) or sw8 or cap2)"

PLUGIN = '''"""Mutants of the example split-KV kernel (tests/conformance/test_mutants.py)."""
import importlib

from heteroserve.plugin_api import ATTENTION, KernelSpec, hookimpl

HETEROSERVE_PLUGIN_API = "1.0"
NAMES = {names!r}


def _loader(module):
    return lambda: importlib.import_module(module).SplitKVAttention


@hookimpl
def heteroserve_register_kernels(registry):
    for name in NAMES:
        registry.register(KernelSpec(op=ATTENTION, name=name, load=_loader("hs_mutants." + name),
                                     platforms=("cpu",), priority=-900))
'''


def mutate(source: str, name: str) -> str:
    """``source`` with mutant ``name``'s edit (the edit must match the kernel as written)."""
    old, new, count = MUTANTS[name]
    found = source.count(old)
    assert found == count, f"mutant {name}: {old!r} occurs {found} times in {KERNEL.name}, " \
                           f"expected {count} (the kernel changed: update the mutant)"
    return source.replace(old, new)


@pytest.fixture(scope="module")
def mutant_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mutants")
    pkg = root / "hs_mutants"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = KERNEL.read_text()
    names = ["mutant_control", *(f"mutant_{n}" for n in MUTANTS)]
    (pkg / "mutant_control.py").write_text(source)
    for n in MUTANTS:
        (pkg / f"mutant_{n}.py").write_text(mutate(source, n))
    (pkg / "plugin.py").write_text(PLUGIN.format(names=names))
    info = root / "hs_mutants-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hs-mutants\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[heteroserve.platforms]\nmutants = hs_mutants.plugin\n")
    return root


def test_every_mutant_of_the_example_kernel_is_caught(mutant_plugin: Path,
                                                      tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(mutant_plugin), env.get("PYTHONPATH")]))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "heteroserve.conformance", "--platform",
         "cpu", "--conformance-quick", "--report", str(out), "-q", "-p", "no:cacheprovider",
         "-k", SELECTION],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 1, log
    report = json.loads((out / "conformance-cpu.json").read_text())
    rows = {r["implementation"]: r for r in report["table"] if r["op"] == "attention"}
    control = rows["mutant_control"]
    assert control["failed"] == 0 and control["passed"] > 0, control
    missed = [n for n in MUTANTS if rows[f"mutant_{n}"]["failed"] == 0]
    assert not missed, f"mutants the suite did not catch: {missed}"
    messages = {f["implementation"]: f["message"] for f in report["failures"]}
    assert "determinism" in messages["mutant_non_deterministic"], messages
    assert report["tier_reached"] == "none"
