"""The prefill headline rows (``bench_headline.py --workloads llama8b_prefill``) under another
routing rule of cuda's default attention backend (``TritonAttentionSDPAExtend``), for a
side-by-side run against the default: ``python3 benchmarks/prefill_cudnn_rule.py RULE --out
X.json [bench_headline args]``. ``RULE``: ``flash_prompts`` (whole prompts in flash, chunks in
cuDNN), ``triton_chunks`` (whole prompts in flash, chunks on a prefix in Triton: the default
before 2026-12-05), ``no_warm_up`` (the default without its start-up cuDNN plans, as before
694f89f), ``torch_merge`` (a chunk's two calls merged by torch ops, as before the Triton
merge), ``copy_output`` (a one-prompt step's cuDNN output copied into a fresh output, as
before 55495e7), ``rotary_in_place`` (a long extend's q / k rotated in place by the layer's
rotary op and q copied into the rows cuDNN takes, as before the prologue wrote them). The
JSON records the rule as ``attention_rule``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_headline  # noqa: E402

from heteroserve.platforms.cuda.sdpa_extend import TritonAttentionSDPAExtend  # noqa: E402

#: rule -> class attributes of TritonAttentionSDPAExtend it sets
RULES = {"flash_prompts": {"cudnn_prompts": False},
         "triton_chunks": {"cudnn_prompts": False, "cudnn_chunks": False},
         "no_warm_up": {"warm_up_plans": False},
         "torch_merge": {"fused_merge": False},
         "copy_output": {"return_kernel_output": False},
         "rotary_in_place": {"rotate_into_rows": False}}


def main() -> int:
    rule = sys.argv[1]
    for name, value in RULES[rule].items():
        setattr(TritonAttentionSDPAExtend, name, value)
    return bench_headline.main_tagged(["--workloads", "llama8b_prefill", *sys.argv[2:]],
                                      {"attention_rule": rule})

if __name__ == "__main__":
    raise SystemExit(main())
