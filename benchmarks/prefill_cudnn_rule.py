"""The prefill headline rows (``bench_headline.py --workloads llama8b_prefill``) under another
routing rule of cuda's default attention backend (``TritonAttentionSDPAExtend``), for a
side-by-side run against the default: ``python3 benchmarks/prefill_cudnn_rule.py RULE --out
X.json [bench_headline args]``. ``RULE``: ``flash_prompts`` (whole prompts in flash, chunks in
cuDNN), ``triton_chunks`` (whole prompts in flash, chunks on a prefix in Triton: the default
before 2026-12-05), ``no_warm_up`` (the default without its start-up cuDNN plans, as before
694f89f), ``torch_merge`` (a chunk's two calls merged by torch ops, as before the Triton
merge), ``copy_output`` (a one-prompt step's cuDNN output copied into a fresh output, as
before 55495e7), ``torch_token_slots`` (the step's token positions and KV slots built on the
host with torch's indexing, as before 2026-12-06 07:30 UTC: :func:`torch_token_slots`). The
JSON records the rule as ``attention_rule``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_headline  # noqa: E402

from heteroserve.core.model_runner import batch_builder  # noqa: E402
from heteroserve.platforms.cuda.sdpa_extend import TritonAttentionSDPAExtend  # noqa: E402

#: rule -> class attributes of TritonAttentionSDPAExtend it sets
RULES = {"flash_prompts": {"cudnn_prompts": False},
         "triton_chunks": {"cudnn_prompts": False, "cudnn_chunks": False},
         "no_warm_up": {"warm_up_plans": False},
         "torch_merge": {"fused_merge": False},
         "copy_output": {"return_kernel_output": False},
         "torch_token_slots": {}}


def torch_token_slots(prefix_lens: list[int], new_counts: list[int], page_indptr: list[int],
                      pages: torch.Tensor, page_size: int,
                      num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_builder._token_slots`` as it was before 2026-12-06 07:30 UTC: the same
    positions and KV slots through torch's host ``aten::index``."""
    counts = torch.tensor(new_counts, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(torch.arange(len(new_counts)), counts,
                                           output_size=num_tokens)
    first_token = torch.cumsum(counts, 0) - counts
    start = torch.tensor(prefix_lens, dtype=torch.int64) - first_token
    positions = torch.arange(num_tokens, dtype=torch.int64) + start[seq_of_token]
    first_page = torch.tensor(page_indptr[:-1], dtype=torch.int64)
    page_of_token = first_page[seq_of_token] + torch.div(positions, page_size,
                                                         rounding_mode="floor")
    page = pages.long()[page_of_token]
    return positions, page * page_size + positions % page_size


def main() -> int:
    rule = sys.argv[1]
    for name, value in RULES[rule].items():
        setattr(TritonAttentionSDPAExtend, name, value)
    if rule == "torch_token_slots":
        batch_builder._token_slots = torch_token_slots
    return bench_headline.main_tagged(["--workloads", "llama8b_prefill", *sys.argv[2:]],
                                      {"attention_rule": rule})

if __name__ == "__main__":
    raise SystemExit(main())
