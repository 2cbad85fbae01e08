"""``benchmarks/kernel_sass.py``: the 4-bit GEMV compiled for sm_90 on this GPU-less host
issues fewer instructions a nibble with the subnormal decoding than with the exponent one,
at each launch shape, and the JSON names every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"

pytestmark = pytest.mark.skipif(not NVDISASM.exists(), reason="triton without nvdisasm")


def test_subnormal_decoding_issues_fewer_instructions(tmp_path: Path) -> None:
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--out",
                    str(out), "--kernels", "w4"], check=True, env=env, timeout=240)
    rows = json.loads(out.read_text())["rows"]
    by = {(r["kernel"], tuple(r["launch_shape"])): r for r in rows}
    shapes = {shape for _, shape in by}
    assert len(rows) == 4 and len(shapes) == 2
    for shape in shapes:
        sub = by[("w4a16_gemv subnormal", shape)]
        exp = by[("w4a16_gemv exponent", shape)]
        assert sub["loop_instructions"] > 0 and sub["top_ops"]["FFMA"] > 0
        assert sub["per_element"] < exp["per_element"] - 1.0, (sub, exp)


def test_w8_gemv_accumulator_stays_small(tmp_path: Path) -> None:
    """The fp8 GEMV's accumulator is ``[BLOCK_N, BLOCK_K / 16]``: under 128 registers a
    thread at every row, the rule's shape and 16 x 1024 (where the tile-shaped accumulator
    took 239, two programs a multiprocessor)."""
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--out",
                    str(out), "--kernels", "w8"], check=True, env=env, timeout=240)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {tuple(r["launch_shape"]) for r in rows} >= {(16, 1024, 4)}
    for row in rows:
        assert 0 < row["registers"] < 128, row
        assert row["per_element"] < row["h200_budget_per_element"], row


def test_w8_gemv_main_loop_is_one_fma_an_element(tmp_path: Path) -> None:
    """Each weight's product joins its sum in one FFMA (the 16 products of a load are added in
    a chain, not a tree of FMUL and FADD), and the activation is rounded onto the fp8 grid by
    the hardware conversion: under 4.5 instructions a weight byte at every row (5.7 with the
    tree and the integer rounding at the fp8-block rule's shape)."""
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--out",
                    str(out), "--kernels", "w8"], check=True, env=env, timeout=240)
    for row in json.loads(out.read_text())["rows"]:
        shape = row["launch_shape"]
        per_thread = shape[0] * shape[1] // (32 * shape[2])
        assert row["top_ops"]["FFMA"] == per_thread, row
        assert row["top_ops"].get("FADD", 0) <= per_thread // 8, row
        assert row["per_element"] < 4.5, row


def test_tma_gemv_reads_its_words_from_shared_memory(tmp_path: Path) -> None:
    """The TMA-pipelined 4-bit GEMV compiles for sm_90 at every row, and its main loop reads
    the words from shared memory (``LDS``: the pipeline's buffers), not from global memory."""
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--out",
                    str(out), "--kernels", "w4_tma"], check=True, env=env, timeout=240)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4
    for row in rows:
        assert row["top_ops"].get("LDS", 0) > 0 and "LDG" not in row["top_ops"], row
        assert row["top_ops"]["FFMA"] > 0 and 2.0 < row["per_element"] < 6.0, row
