"""cuBLASLt fp8 call rules (``platforms/triton/cublas_fp8.py``), for side-by-side offline
runs: ``python3 benchmarks/fp8_mm_rule.py RULE [bench_quant_llama8b.py options]`` runs
``bench_quant_llama8b.py`` with the rule installed and records it as ``fp8_mm_rule`` in
``quant_llama8b.json``. Batch-1 decode does not reach these calls (the one-row GEMV does);
the offline rows do, at every prefill chunk and decode batch above four rows.

Rules:

- ``default``: as the code stands (no fast accumulation, the activation first).
- ``fast``: fast fp8 accumulation in the per-tensor and per-channel cuBLASLt calls (the
  block-scaled call refuses it).
- ``swap4096``: fp8-block products of at most 4096 outputs weight-first (Llama-3.1-8B's
  ``o_proj`` and ``down_proj``, where the block-scaled GEMM ran 0.85x / 0.93x bf16 at 8192
  rows on an H100, ``results/h100-20261207-0939-fp8_block_tiles.json``).
- ``fast_swap4096``: both.
- ``flashinfer``, ``flashinfer256``, ``flashinfer64``: fp8-block products of 512 / 256 / 64+
  rows through flashinfer's sm90 block-scale GEMM (``platforms/cuda/flashinfer_fp8_block.py``
  ``MIN_ROWS``, with ``CAPTURE`` on; the smaller thresholds reach the decode graphs'
  batches). The linear must be
  that one (the cuda default where flashinfer runs; ``HS_KERNELS=linear.fp8_block=flashinfer``
  forces it, as gpu_session.sh's fp8fi step does for these rules).
- ``flashinfer64_fused``: ``flashinfer64`` with the down projection's SiLU-and-mul writing
  the runner's fp8 input (``FUSED_SILU_AND_MUL`` on, the default since 2026-12-07 22:30);
  ``flashinfer64_unfused``: with it a separate bf16 launch, the runner quantizing its input
  itself. ``flashinfer``, ``flashinfer256`` and ``flashinfer64`` leave it off.
- ``cublas``: as ``default``, run with ``HS_KERNELS=linear.fp8_block=triton`` (the fp8fi step
  sets it), the Triton method whose fp8-block products of 5+ rows run on cuBLASLt.
"""

from __future__ import annotations

import sys
from pathlib import Path

from heteroserve.platforms.triton import cublas_fp8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402

#: rule -> (fast accumulation, BLOCK_SWAP_MAX_N, flashinfer's MIN_ROWS or None: as coded)
RULES = {"default": (False, 0, None), "fast": (True, 0, None), "swap4096": (False, 4096, None),
         "fast_swap4096": (True, 4096, None), "flashinfer": (False, 0, 512),
         "flashinfer256": (False, 0, 256), "flashinfer64": (False, 0, 64),
         "flashinfer64_fused": (False, 0, 64), "flashinfer64_unfused": (False, 0, 64),
         "cublas": (False, 0, None)}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    fast, swap_max_n, fi_min_rows = rule_named("fp8_mm_rule", RULES, rule)
    if fi_min_rows is not None:
        from heteroserve.platforms.cuda import flashinfer_fp8_block

        flashinfer_fp8_block.MIN_ROWS = fi_min_rows
        flashinfer_fp8_block.CAPTURE = True
        flashinfer_fp8_block.FUSED_SILU_AND_MUL = rule.endswith("_fused")
    cublas_fp8.FAST_ACCUM.clear()
    if fast:
        cublas_fp8.FAST_ACCUM.update(cublas_fp8.FAST_ACCUM_SCHEMES)
    cublas_fp8.BLOCK_SWAP_MAX_N = swap_max_n


def main() -> int:
    import bench_quant_llama8b

    apply(sys.argv[1])
    return bench_quant_llama8b.main(sys.argv[2:], {"fp8_mm_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
