"""Where two platforms' runs of one model part: every module's prefill output, recorded by
forward hooks in execution order, compared pairwise. For a parity test that fails on a device
only: the first modules past the tolerance name the op to look at.

Usage (from the repository root, on the device's machine)::

    python tests/support/module_divergence.py cpu cuda

builds the tiny fp8-block DeepSeek-V3 checkpoint of ``tests/models/test_deepseek_fusion.py``,
runs its prompt on each platform (fp32, no decode graph) and prints each platform's logits
error against the transformers reference, then the first modules whose outputs differ by more
than ``--tol`` (relative to the larger output's max).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_harness import PagedSequence, extend  # noqa: E402
from parity import PROMPT, rel_error  # noqa: E402

Record = list[tuple[str, torch.Tensor]]


def module_outputs(runner, prompt: list[int]) -> tuple[torch.Tensor, Record]:
    """``(last logits, [(module name, first tensor output on the CPU, fp32)])`` of one prefill
    of ``prompt``, modules in the order they returned."""
    record: Record = []

    def hook(name: str, out) -> None:
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, torch.Tensor):
            record.append((name, t.detach().float().cpu().clone()))

    handles = [mod.register_forward_hook(lambda m, a, o, name=name: hook(name, o))
               for name, mod in runner.model.named_modules()]
    try:
        logits = extend(runner, [(prompt, 0, PagedSequence(runner, len(prompt) + 1))])[0]
    finally:
        for h in handles:
            h.remove()
    return logits, record


def departures(a: Record, b: Record, tol: float) -> list[tuple[str, float]]:
    """``(name, relative max difference)`` of each module whose outputs differ by more than
    ``tol``, in order; stops at the first module whose name or shape does not match."""
    out = []
    for (na, ta), (nb, tb) in zip(a, b):
        if na != nb or ta.shape != tb.shape:
            break
        scale = torch.maximum(ta.abs().max(), tb.abs().max()).clamp_min(1e-30)
        err = ((ta - tb).abs().max() / scale).item()
        if err > tol:
            out.append((na, err))
    return out


def main(argv: list[str] | None = None) -> int:
    from heteroserve.core.config import ServerArgs
    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.models.tiny import build_tiny_model
    from quant_checkpoints import dequantized_reference, write_quantized

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("platforms", nargs=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--show", type=int, default=20)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    v3 = build_tiny_model(tmp / "v3", "deepseek_v3", seed=3, moe_intermediate_size=128,
                          q_lora_rank=128)
    path, _, _ = write_quantized(v3, tmp / "ckpt", "fp8-block")
    hf = dequantized_reference(path, "fp8_block", 32, tmp / "ref",
                               skip=("kv_b_proj", "shared_experts"))
    ref = hf(torch.tensor([PROMPT])).logits[0, -1]
    records = []
    for platform in a.platforms:
        runner = build_model_runner(ServerArgs(model_path=str(path), dtype="float32",
                                               platform=platform, max_total_tokens=4096,
                                               disable_cuda_graph=True))[2]
        logits, record = module_outputs(runner, PROMPT)
        print(f"{platform}: logits vs transformers {rel_error(logits, ref):.3e}")
        records.append(record)
    found = departures(*records, a.tol)
    for name, err in found[:a.show]:
        print(f"  {name:60s} {err:.3e}")
    print(f"{len(found)} of {min(map(len, records))} module outputs differ by more than {a.tol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
