"""The random-weight Llama models and the in-process engine that the CPU benchmarks share.

``tiny``: hidden 128, 2 layers, 4/2 heads, intermediate 256, vocab 8000.
``small``: hidden 768, 12 layers, 12/4 heads (head 64), intermediate 2048, vocab 8000.
Both are built once with :func:`heteroserve.core.models.tiny.build_tiny_model` (fp32
safetensors) under ``$HS_BENCH_MODELS`` (default ``/tmp/heteroserve-bench-models``).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

MODEL_ROOT = Path(os.environ.get("HS_BENCH_MODELS", "/tmp/heteroserve-bench-models"))

#: model name -> config overrides for build_tiny_model("llama", ...)
MODELS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64),
}
VOCAB = 8000


def model_dir(name: str) -> Path:
    """Build model ``name`` once (a few seconds) and return its folder."""
    from heteroserve.core.models.tiny import build_tiny_model

    path = MODEL_ROOT / name
    if not (path / "config.json").exists():
        build_tiny_model(path, "llama", seed=0, vocab_size=VOCAB, **MODELS[name])
    return path


def build_engine(name: str, dtype: str, max_running: int = 64, cpu_threads: str | None = None,
                 torch_compile: bool = False):
    """``(runner, scheduler)`` for model ``name`` on the cpu platform, radix cache off;
    ``torch_compile``: ``--enable-torch-compile``."""
    from heteroserve.core.config import ServerArgs
    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.scheduler import Scheduler

    # older code (measured for before/after comparisons) has no cpu_threads: the caller's
    # torch.set_num_threads stands in for it there
    known = {f.name for f in dataclasses.fields(ServerArgs)}
    extra = {"cpu_threads": cpu_threads} if cpu_threads and "cpu_threads" in known else {}
    if torch_compile:
        extra["enable_torch_compile"] = True
    args = ServerArgs(model_path=str(model_dir(name)), dtype=dtype, platform="cpu",
                      disable_radix_cache=True, max_running_requests=max_running,
                      max_total_tokens=max_running * 256, **extra)
    _, _, runner = build_model_runner(args)
    return runner, Scheduler(runner, args, [], runner.page_size)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def generate(scheduler, prompts: list[list[int]], new_tokens: int, tag: str = "r"
             ) -> dict[str, list[int]]:
    """Greedy-decode every prompt to exactly ``new_tokens`` tokens; returns ids by request."""
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    out: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        scheduler.add_request(Req(rid=f"{tag}{i}", input_ids=ids, sampling_params=sp))
        out[f"{tag}{i}"] = []
    while scheduler.has_work():
        for o in scheduler.step():
            out[o.rid].extend(o.new_token_ids)
    return out
