"""The CLI a vendor meets first: ``platforms --explain`` one line per op (``--verbose``: the
full table) and ``conformance`` saying in one line that pytest is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from heteroserve.core.kernels.dispatch import wanted_ops
from heteroserve.server.cli import main
from heteroserve.server.platforms_cmd import grouped_rejections


def test_rejections_group_by_reason_and_fold_other_platforms() -> None:
    line = grouped_rejections([
        {"name": "triton", "reason": "runs only on cuda, rocm"},
        {"name": "flashinfer", "reason": "runs only on cuda"},
        {"name": "slow", "reason": "lower priority than fast"},
        {"name": "slower", "reason": "lower priority than fast"},
        {"name": "fp8", "reason": "head size 96 not supported"}])
    assert line == ("lower priority than fast (slow, slower); head size 96 not supported (fp8); "
                    "2 for other platforms (cuda, rocm)")


def test_explain_is_one_line_per_op_and_verbose_is_the_full_table(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["platforms", "--explain", "--platform", "cpu"]) == 0
    short = capsys.readouterr().out.splitlines()
    op_lines = [ln for ln in short if ln.startswith("    ") and " -> " in ln]
    assert len(op_lines) == len(wanted_ops()), short
    assert not [ln for ln in short if ln.strip().startswith("not ")]
    assert main(["platforms", "--explain", "--verbose", "--platform", "cpu"]) == 0
    full = capsys.readouterr().out.splitlines()
    assert len(full) > len(short)
    assert any(ln.strip().startswith("not ") and "runs only on" in ln for ln in full)


def test_conformance_without_pytest_says_so_in_one_line() -> None:
    code = ("import sys; sys.modules['pytest'] = None\n"
            "from heteroserve.server.cli import main\n"
            "raise SystemExit(main(['conformance', '--platform', 'cpu']))")
    proc = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs pytest" in lines[0] \
        and "heteroserve[conformance]" in lines[0], proc.stderr
