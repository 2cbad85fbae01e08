"""``heteroserve bench --json-schema SCHEMA``: decode throughput with and without a JSON-schema
constraint, at batch 1 and batch 64, and their ratio."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path
from typing import Any

BATCHES = (1, 64)


def load_schema(value: str) -> str:
    """A schema given inline as JSON or as ``@path``; raises ``ValueError`` if it is not JSON."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--json-schema is not valid JSON: {exc}") from None
    return text


def run_structured(engine: Any, args: argparse.Namespace, vocab: list[int],
                   run_all: Any, summarize: Any) -> dict[str, Any]:
    """For each batch size, unconstrained vs constrained (same prompts, same max_new_tokens;
    the constrained requests stop when their JSON is complete): output tok/s, inter-token
    latency, and the decode-speed ratio (unconstrained ITL / constrained ITL)."""
    schema = load_schema(args.json_schema)
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"schema": json.loads(schema)}
    base = {"max_new_tokens": args.output_len, "temperature": args.temperature}
    for batch in BATCHES:
        prompts = [[rng.choice(vocab) for _ in range(args.input_len)] for _ in range(batch)]
        row: dict[str, Any] = {}
        for name, params in (("unconstrained", {**base, "ignore_eos": True}),
                             ("constrained", {**base, "json_schema": schema})):
            records, duration, peak = asyncio.run(run_all(engine, prompts, params, args))
            m = summarize(records, duration, peak)
            row[name] = {"output_tok_per_s": m["output_throughput"], "itl_ms_p50": m["itl_ms_p50"],
                         "output_tokens": m["total_output_tokens"], "duration_s": m["duration_s"],
                         "failed": m["failed"]}
        # decode speed is 1 / inter-token latency: constrained outputs end early (their JSON
        # is complete), so whole-run tok/s would mix in prefill and start-up
        row["decode_speed_ratio"] = (row["unconstrained"]["itl_ms_p50"]
                                     / max(row["constrained"]["itl_ms_p50"], 1e-9))
        result[f"batch_{batch}"] = row
        print(f"batch {batch:>3}: unconstrained {row['unconstrained']['output_tok_per_s']:.1f} "
              f"tok/s, constrained {row['constrained']['output_tok_per_s']:.1f} tok/s, "
              f"decode speed constrained/unconstrained {row['decode_speed_ratio']:.2f} "
              f"(ITL p50 {row['constrained']['itl_ms_p50']:.2f} vs "
              f"{row['unconstrained']['itl_ms_p50']:.2f} ms)")
    return result
