"""What the in-process engine benchmarks share (bench_llama8b.py, bench_models.py,
bench_headline.py): building an engine (model runner + scheduler) from a model folder, random
prompts, driving requests to completion with timing, and freeing an engine.

Nothing here names a device: synchronisation and cache release go through the runner's
platform, so the same code runs the cpu smoke checks and the GPU measurements.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def rule_named(script: str, rules: dict[str, T], rule: str) -> T:
    """``rules[rule]`` of a side-by-side script (``gemv_rule``, ``w8_rule``, ...). Raises
    ``SystemExit`` naming ``script`` and the known rules for an unknown one."""
    if rule not in rules:
        raise SystemExit(f"{script}: unknown rule {rule!r} (known: {', '.join(rules)})")
    return rules[rule]


def log(msg: str) -> None:
    """One progress line on stdout, prefixed with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_engine(model_dir: Path, *, platform: str, dtype: str = "bfloat16",
                 load_format: str = "dummy", **server_args):
    """``(runner, scheduler, dispatch)`` for ``model_dir``; ``server_args`` are further
    :class:`ServerArgs` fields (e.g. ``max_running_requests``, ``context_length``).
    ``HS_KERNELS`` (comma-separated ``OP=IMPL``) adds kernel overrides; ``HS_SERVER_ARGS`` (a
    JSON object, e.g. ``{"enable_mixed_chunk": true}``) further fields."""
    from heteroserve.core.config import ServerArgs
    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.scheduler import Scheduler

    kernels = [k for k in os.environ.get("HS_KERNELS", "").split(",") if k]
    server_args = {**json.loads(os.environ.get("HS_SERVER_ARGS") or "{}"), **server_args}
    args = ServerArgs(model_path=str(model_dir), load_format=load_format, dtype=dtype,
                      platform=platform, kernel=kernels, **server_args)
    _, dispatch, runner = build_model_runner(args)
    return runner, Scheduler(runner, args, [], runner.page_size), dispatch


def free_engine(platform, device) -> None:
    """Return an engine's device memory once the caller has dropped its runner and
    scheduler (``platform, device = runner.platform, runner.device; del runner, scheduler``)."""
    platform.synchronize(device)
    gc.collect()
    platform.empty_cache()


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids drawn from ``[10, vocab)``, deterministic per seed."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def run_requests(scheduler, prompts: list[list[int]], output_len: int,
                 sync_steps: bool = False) -> dict:
    """Submit every prompt (greedy, ``ignore_eos``, exactly ``output_len`` new tokens), step
    until done. Returns wall time (``elapsed_s``), step count, token counts, p50/p99 time to
    first token and inter-token latency (seconds) and the scheduler's stats.

    ``sync_steps``: synchronise the device after every step and return each step's duration
    (``step_s``; for one long prompt these are the prefill chunks), at the cost of one
    synchronisation per step.
    """
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    runner = scheduler.runner
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    step_s: list[float] = []
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
        scheduler.add_request(Req(rid=f"r{i}", input_ids=ids, sampling_params=sp))
    steps = 0
    prev = time.perf_counter()
    while scheduler.has_work():
        outs = scheduler.step()
        steps += 1
        if sync_steps:
            runner.platform.synchronize(runner.device)
        now = time.perf_counter()
        if sync_steps:
            step_s.append(now - prev)
            prev = now
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.rid, now)
                last[o.rid] = now
                counts[o.rid] = counts.get(o.rid, 0) + len(o.new_token_ids)
    runner.platform.synchronize(runner.device)
    elapsed = time.perf_counter() - t0
    ttft = sorted(first[r] - t0 for r in first)
    itl = sorted((last[r] - first[r]) / max(counts[r] - 1, 1) for r in first if counts[r] > 1)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    out = {"elapsed_s": elapsed, "steps": steps, "output_tokens": sum(counts.values()),
           "input_tokens": sum(len(p) for p in prompts),
           "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
           "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99),
           "stats": scheduler.get_stats()}
    if sync_steps:
        out["step_s"] = step_s
    return out


#: a fused MoE's per-expert tensors (weights, and the scales / zero points of quantized ones)
_EXPERT_TENSORS = ("w13", "w2", "w13_scale", "w2_scale", "w13_zero", "w2_zero")


def active_weight_bytes(runner) -> int:
    """Bytes of weights one decode token reads: every dense weight, the LM head (the whole
    embedding matrix when tied), one embedding row, and of a fused MoE's routed experts (their
    scales and zero points too) only ``top_k / num_experts`` (plus any always-on shared
    experts stored after them)."""
    from heteroserve.core.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from heteroserve.core.layers.moe import FusedMoE

    tied = runner.model_config.tie_word_embeddings
    seen: set[int] = set()
    total = 0.0
    for module in runner.model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            if isinstance(module, FusedMoE) and name in _EXPERT_TENSORS:
                # top_k routed experts, plus any always-on shared experts stored after them
                routed = getattr(module, "num_routed", p.shape[0])
                size = size * (module.top_k + p.shape[0] - routed) / p.shape[0]
            elif (isinstance(module, VocabParallelEmbedding)
                  and not isinstance(module, ParallelLMHead) and not tied):
                size = p.shape[1] * p.element_size()
            total += size
    return int(total)


def kv_bytes_per_token(runner) -> int:
    return runner.kv.bytes_per_page // runner.kv.page_size
