"""Instruction counts of the quantized GEMVs' main loops, compiled for sm_90 on a host without
a GPU (triton ships ptxas and nvdisasm): a kernel whose loop issues more instructions per
weight element than the issue slots allow at the copy rate cannot reach the copy rate.

An H200 issues 132 SMs x 4 schedulers x 1.98 GHz x 32 lanes = 33.4e12 thread-instructions a
second; at its 4.27 TB/s copy rate that is 7.8 instructions a byte, 3.9 a 4-bit weight.

Usage: ``python benchmarks/kernel_sass.py --out sass.json`` (about a minute on two cores). Each
row: kernel, launch shape, SASS instructions in the main loop, per weight element, the most
frequent opcodes, and registers a thread (``cuobjdump --dump-resource-usage``: registers
bound how many programs share a multiprocessor, so how many loads are in flight). The launch's integer arguments are marked divisible by 16 (Triton's
specialisation of a real launch), so loads vectorise as they do on the device.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)
H200_SMS = 132
#: thread-instructions an H200 issues per weight element at its copy rate (see the module)
H200_BUDGET = {"4-bit": 3.9, "8-bit": 7.8}


def compile_sm90(fn: Callable, signature: dict[str, str], constexprs: dict[str, object],
                 num_warps: int, num_stages: int) -> bytes:
    """The cubin of ``fn`` for sm_90; every non-constexpr argument whose type is a pointer or
    ``i32`` is marked divisible by 16."""
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t.startswith("*") or t == "i32"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=SM90,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.asm["cubin"]


def _cubin_tool(tool: str, cubin: bytes, *args: str) -> str:
    """The stdout of Triton's shipped ``tool`` (nvdisasm, cuobjdump) run on ``cubin``."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(path), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def registers(cubin: bytes) -> int:
    """Registers a thread of the cubin's kernel."""
    out = _cubin_tool("cuobjdump", cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no register count in cuobjdump's output: {out[:200]}")
    return int(m.group(1))


def main_loop_ops(cubin: bytes) -> collections.Counter[str]:
    """Opcode counts (without modifiers) of the longest backward branch's body: the kernel's
    main loop."""
    lines = _cubin_tool("nvdisasm", cubin, "-c").splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^\s*\.(L_x_\d+):", line))}
    start, end = 0, -1
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i \
                and i - labels[m.group(1)] > end - start:
            start, end = labels[m.group(1)], i
    ops: collections.Counter[str] = collections.Counter()
    for line in lines[start:end + 1]:
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def w4_rows() -> list[dict]:
    """The 4-bit GEMV in both nibble decodings at two launch shapes of its rule (bf16
    activations, group 128)."""
    from heteroserve.platforms.triton import w4a16_gemv as w4

    sig = {"x_ptr": "*bf16", "qw_ptr": "*i32", "z_ptr": "*fp16", "s_ptr": "*fp16",
           "bias_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_qk": "i32", "stride_zg": "i32", "stride_sg": "i32", "stride_ym": "i32",
           "HAS_BIAS": "constexpr", "EVEN": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_KW": "constexpr", "ROWS": "constexpr", "GROUP_W": "constexpr",
           "SUBNORMAL": "constexpr", "PREFETCH": "constexpr", "USE_PDL": "constexpr"}
    rows = []
    for nibble in (w4.NIBBLE_EXPONENT, w4.NIBBLE_SUBNORMAL):
        for block_n, block_kw, warps in ((16, 256, 4), (32, 128, 4)):
            subnormal = nibble == w4.NIBBLE_SUBNORMAL
            consts = {"HAS_BIAS": False, "EVEN": True, "BLOCK_N": block_n,
                      "BLOCK_KW": block_kw, "ROWS": w4.rows_per_thread(16, block_kw),
                      "GROUP_W": 16, "SUBNORMAL": subnormal, "PREFETCH": False,
                      "USE_PDL": True}
            cubin = compile_sm90(w4._w4a16_gemv_kernel, sig, consts, warps, 1)
            elements = block_n * block_kw * 8  # nibbles a loop iteration
            rows.append(_row(f"w4a16_gemv {nibble}", (block_n, block_kw, warps), cubin,
                             elements, warps, "4-bit"))
    return rows


def w4_tma_rows() -> list[dict]:
    """The TMA-pipelined 4-bit GEMV (``w4a16_gemv_tma.py``) at 16 columns x 256 word rows on
    4 warps, 2-4 stages, and 32 x 256 on 8 warps, 3 stages (bf16 activations, group 128)."""
    from heteroserve.platforms.triton import w4a16_gemv_tma as tma

    rows = []
    for block_n, block_kw, warps, stages in ((16, 256, 4, 2), (16, 256, 4, 3), (16, 256, 4, 4),
                                             (32, 256, 8, 3)):
        t = block_kw // 4
        sig = {"x_ptr": "*bf16", "qw_desc": f"tensordesc<i32[{t}, 1, {block_n}]>",
               "qw_ptr": "*i32", "z_ptr": "*fp16", "s_ptr": "*fp16", "bias_ptr": "*bf16", "y_ptr": "*bf16",
               "N": "i32", "K": "i32", "stride_xm": "i32", "stride_zg": "i32",
               "stride_sg": "i32", "stride_ym": "i32",
               **{c: "constexpr" for c in ("HAS_BIAS", "BLOCK_N", "BLOCK_KW", "ROWS",
                                           "GROUP_W", "SUBNORMAL", "NUM_STAGES", "EVEN",
                                           "PREFETCH_ROWS", "USE_PDL")}}
        consts = {"HAS_BIAS": False, "BLOCK_N": block_n, "BLOCK_KW": block_kw, "ROWS": 4,
                  "GROUP_W": 16, "SUBNORMAL": True, "NUM_STAGES": stages, "EVEN": True,
                  "PREFETCH_ROWS": 0, "USE_PDL": True}
        cubin = compile_sm90(tma._w4a16_gemv_tma_kernel, sig, consts, warps, stages)
        rows.append(_row(f"w4a16_gemv_tma {stages} stages", (block_n, block_kw, warps), cubin,
                         block_n * block_kw * 8, warps, "4-bit"))
    return rows


def w8_rows() -> list[dict]:
    """The fp8 GEMV at each activation granularity, at its launch rule's shape for Llama-8B's
    layers (8 rows x 2048 columns) and at 16 x 1024 (the shape of the rule before, where the
    accumulator that had the tile's shape took 239 registers)."""
    from heteroserve.platforms.triton import w8_gemv as w8

    sig = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "bias_ptr": "*bf16",
           "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_wn": "i32", "stride_wsn": "i32", "stride_ym": "i32", "qmax": "fp32",
           "min_scale": "fp32", **{c: "constexpr" for c in (
               "ACT", "WS", "IS_INT", "HAS_BIAS", "MIN_NORMAL", "SUB_MAGIC", "EVEN", "BLOCK_N",
               "BLOCK_K", "GROUP", "AMAX_BLOCK", "USE_PDL", "FOLD", "CAST_FP8",
               "PREFETCH_LINES")}}
    min_normal = 2.0 ** -6
    rows = []
    for name, act, ws in (("fp8 block", w8.ACT_GROUP, w8.WS_BLOCK),
                          ("fp8 per tensor", w8.ACT_TENSOR, w8.WS_TENSOR),
                          ("fp8 per channel", w8.ACT_ROW, w8.WS_CHANNEL)):
        rule = w8.w8_launch_rule(4096, 4096, 1, H200_SMS, act)
        for block_n, block_k, warps in ((rule.block_n, rule.block_k, rule.num_warps),
                                        (16, 1024, 4)):
            consts = {"ACT": act, "WS": ws, "IS_INT": False, "HAS_BIAS": False,
                      "MIN_NORMAL": min_normal, "SUB_MAGIC": 1.5 * 2.0 ** 23 * min_normal / 8,
                      "EVEN": True, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": 128,
                      "AMAX_BLOCK": 4096, "USE_PDL": True, "FOLD": 16, "CAST_FP8": True,
                      "PREFETCH_LINES": 0}
            cubin = compile_sm90(w8._w8_gemv_kernel, sig, consts, warps, 1)
            rows.append(_row(f"w8_gemv {name}", (block_n, block_k, warps), cubin,
                             block_n * block_k, warps, "8-bit"))
    return rows


def _row(kernel: str, shape: tuple[int, int, int], cubin: bytes, elements: int, warps: int,
         width: str) -> dict:
    ops = main_loop_ops(cubin)
    per_thread = elements / (32 * warps)
    total = sum(ops.values())
    row = {"kernel": kernel, "launch_shape": shape, "loop_instructions": total,
           "per_element": total / per_thread, "h200_budget_per_element": H200_BUDGET[width],
           "registers": registers(cubin), "top_ops": dict(ops.most_common(10))}
    print(f"{kernel:24s} {str(shape):16s} {row['per_element']:5.2f} a weight element "
          f"(H200 budget {H200_BUDGET[width]}), {row['registers']:3d} registers  "
          f"{row['top_ops']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="kernel_sass.json")
    ap.add_argument("--kernels", default="w4,w8",
                    help="comma-separated subset of w4, w4_tma, w8")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the kernels must compile, not be interpreted")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the device's default
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name in a.kernels.split(","):
        rows += {"w4": w4_rows, "w4_tma": w4_tma_rows, "w8": w8_rows}[name]()
    Path(a.out).write_text(json.dumps({
        "target": "sm_90", "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
        "seconds": time.perf_counter() - t0, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
