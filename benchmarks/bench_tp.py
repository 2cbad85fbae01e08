"""Tensor-parallel end-to-end numbers through the full engine (frontend + one scheduler
process per rank): batch-1 decode and offline throughput of the Llama-3.1-8B-shaped model
with dummy bf16 weights. Token ids are random; a small local tokenizer only detokenizes.

    python benchmarks/bench_tp.py --tp-size 2 --num-prompts 1024 --out bench_tp2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "models" / "llama-3.1-8b"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp-size", type=int, default=2)
    ap.add_argument("--platform", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--out", default="bench_tp.json")
    a = ap.parse_args()
    import torch

    import heteroserve
    from heteroserve.core.models.tiny import build_tokenizer

    tok_dir = Path(tempfile.mkdtemp()) / "tok"
    build_tokenizer(tok_dir)
    engine = heteroserve.Engine(model_path=str(MODEL_DIR), tokenizer_path=str(tok_dir),
                                load_format="dummy", dtype="bfloat16", platform=a.platform,
                                tp_size=a.tp_size, mem_fraction_static=0.8)
    rng = random.Random(0)
    result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "gpus": a.tp_size, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv), "startup": engine.info.__dict__}
    sp = {"max_new_tokens": 256, "temperature": 0, "ignore_eos": True}
    engine.generate(input_ids=[rng.randrange(10, 128000) for _ in range(32)],
                    sampling_params={**sp, "max_new_tokens": 16})
    stamps = []
    for _ in engine.generate(input_ids=[rng.randrange(10, 128000) for _ in range(128)],
                             sampling_params=sp, stream=True):
        stamps.append(time.perf_counter())
    gaps = sorted(b - c for b, c in zip(stamps[1:], stamps[:-1]))
    result["decode1"] = {"tok_per_s": 1 / gaps[len(gaps) // 2], "itl_p50_s": gaps[len(gaps) // 2],
                         "chunks": len(stamps)}
    print("decode1", result["decode1"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    prompts = [[rng.randrange(10, 128000) for _ in range(a.input_len)] for _ in range(a.num_prompts)]
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params={**sp, "max_new_tokens": a.output_len})
    elapsed = time.perf_counter() - start
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    result["throughput"] = {"num_prompts": a.num_prompts, "input_len": a.input_len,
                            "output_len": a.output_len, "elapsed_s": elapsed,
                            "total_tok_per_s": (a.num_prompts * a.input_len + out_tokens) / elapsed,
                            "output_tok_per_s": out_tokens / elapsed}
    print("throughput", result["throughput"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
