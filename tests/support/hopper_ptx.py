"""Compile a Triton kernel to PTX for an NVIDIA Hopper GPU (sm_90a) without a GPU, so tests
can check that the compiled path (not the interpreter's) builds, vectorises its loads and
emits the PDL instructions. Must run in a process without ``TRITON_INTERPRET`` (the kernels
must be decorated as compilable functions): ``python hopper_ptx.py JOBS`` with ``JOBS`` a
JSON list of ``{"module", "kernel", "signature", "constexprs", "aligned", "num_warps"}``
(optional ``"num_stages"``, default 1, and ``"resources": true``) prints a JSON list of
``{"v4_loads", "griddepcontrol_wait", "ptx_lines", "f32_ops"}`` (the counts of
``fma``/``mul``/``add`` f32 instructions; with ``resources`` also ``"registers"`` and
``"stack"`` from the cubin), one per job."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_hopper(kernel: object, signature: dict[str, str], constexprs: dict[str, object],
                   aligned: list[str], num_warps: int, num_stages: int = 1) -> dict:
    """Triton's assembly dict (``ptx``, ``cubin``, ...) of ``kernel`` for sm_90a; arguments
    named in ``aligned`` are specialised as 16-aligned pointers / multiples of 16, as
    Triton's launcher does at run time."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name in aligned}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "launch_pdl": True})
    return compiled.asm


def ptx_of(kernel: object, signature: dict[str, str], constexprs: dict[str, object],
           aligned: list[str], num_warps: int) -> str:
    """PTX of ``kernel`` for sm_90a (see :func:`compile_hopper`)."""
    return compile_hopper(kernel, signature, constexprs, aligned, num_warps)["ptx"]


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``{"registers", "stack"}`` of the cubin's kernel from Triton's shipped cuobjdump: the
    registers a thread and the bytes of stack a thread (register spills and local arrays)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:200]}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2))}


def main() -> int:
    results = []
    for job in json.loads(sys.argv[1]):
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        asm = compile_hopper(kernel, job["signature"], job["constexprs"], job["aligned"],
                             job["num_warps"], job.get("num_stages", 1))
        ptx = asm["ptx"]
        usage = resource_usage(asm["cubin"]) if job.get("resources") else {}
        results.append({**usage, "v4_loads": len(re.findall(r"ld\.global\S*\.v4", ptx)),
                        "griddepcontrol_wait": "griddepcontrol.wait" in ptx,
                        "ptx_lines": ptx.count("\n"),
                        "f32_ops": {op: len(re.findall(rf"\b{op}(\.rn)?\.f32\b", ptx))
                                    for op in ("fma", "mul", "add")}})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
