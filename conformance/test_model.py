"""Model-level check: greedy decode of small random-weight models through ``heteroserve.Engine``
on the platform equals transformers' greedy output (float32, 16 tokens, two prompts in one
batch, then the second alone: batch 1 is where platforms fuse the most)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heteroserve.conformance.cases.platform import ModelCase, model_cases
from heteroserve.conformance.checks import record_error
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.params import ConfParam, conformance

PROMPTS = ("The quick brown fox", "Hello, world! How are you today? I am fine, thank you.")


def _reference(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare all tokens, as ignore_eos does
    out = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


@conformance(model_cases, impl="engine")
def test_model_greedy(conf: ConfParam, ctx: ConformanceContext,
                      tmp_path_factory: pytest.TempPathFactory,
                      request: pytest.FixtureRequest) -> None:
    case: ModelCase = conf.case  # type: ignore[assignment]
    try:
        from heteroserve.core.engine import Engine
    except ImportError:
        pytest.skip("engine not available")
    from transformers import AutoTokenizer

    from heteroserve.core.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{case.arch}"), case.arch, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    want = _reference(path, prompts, case.new_tokens)
    engine = Engine(model_path=str(path), platform=ctx.name, dtype="float32",
                    max_total_tokens=4096)
    try:
        params = {"max_new_tokens": case.new_tokens, "temperature": 0.0, "ignore_eos": True}
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        alone = engine.generate(input_ids=prompts[1:], sampling_params=params)  # batch 1
    finally:
        engine.shutdown()
    got = [list(o["output_ids"]) for o in outs] + [list(alone[0]["output_ids"])]
    want = want + want[1:]
    record_error(request, 0.0 if got == want else 1.0)
    for i, (g, w) in enumerate(zip(got, want)):
        what = "alone (batch 1)" if i == len(PROMPTS) else "in a batch of two"
        prompt = PROMPTS[min(i, len(PROMPTS) - 1)]
        assert g == w, f"prompt {prompt!r} {what}: engine {g} != transformers {w}"
