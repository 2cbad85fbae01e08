"""Prompt logprobs (``logprob_start_len``) equal transformers' log-softmax over the prompt,
through chunked prefill and a warm prefix cache, with and without generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heteroserve import Engine


@pytest.fixture(scope="module")
def chunked_engine(tiny_model: Path, engine_kwargs: dict):
    engine = Engine(str(tiny_model), **{**engine_kwargs, "chunked_prefill_size": 5,
                                        "max_prefill_tokens": 5})
    yield engine
    engine.shutdown()


def _hf_prompt_logprobs(hf_model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_prompt_logprobs_match_transformers(chunked_engine: Engine, hf_model) -> None:
    ids = chunked_engine.tokenizer.encode("The quick brown fox jumps over the lazy dog today")
    assert len(ids) > 10  # several prefill chunks of 5
    expected = _hf_prompt_logprobs(hf_model, ids)
    for run in range(2):  # the second run finds the prompt in the prefix cache
        out = chunked_engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0},
                                      return_logprob=True, logprob_start_len=0,
                                      top_logprobs_num=2)
        meta = out["meta_info"]
        got = meta["input_token_logprobs"]
        assert [t for _, t, _ in got] == ids, run
        assert got[0][0] is None
        assert torch.allclose(torch.tensor([v for v, _, _ in got[1:]], dtype=torch.float64),
                              torch.tensor(expected, dtype=torch.float64), atol=1e-4), run
        assert len(meta["input_top_logprobs"]) == len(ids)
        assert all(len(alts) == 2 for alts in meta["input_top_logprobs"][1:])
        assert out["output_ids"] == [] and meta["finish_reason"]["type"] == "length"


def test_prompt_logprobs_from_a_start_position_then_generation(chunked_engine: Engine,
                                                               hf_model) -> None:
    ids = chunked_engine.tokenizer.encode("Water boils at one hundred degrees, they say")
    expected = _hf_prompt_logprobs(hf_model, ids)
    start = 6
    out = chunked_engine.generate(input_ids=ids, sampling_params={
        "max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True},
        return_logprob=True, logprob_start_len=start)
    got = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[start:]
    assert torch.allclose(torch.tensor([v for v, _, _ in got], dtype=torch.float64),
                          torch.tensor(expected[start - 1:], dtype=torch.float64), atol=1e-4)
    assert len(out["output_ids"]) == 3 and len(out["meta_info"]["output_token_logprobs"]) == 3


def test_plain_script_without_main_guard_runs(tmp_path: Path, tiny_model: Path) -> None:
    """The README's offline example, pasted into a file with no ``__main__`` guard."""
    import subprocess
    import sys

    script = tmp_path / "example.py"
    script.write_text(
        "import heteroserve\n\n"
        f"engine = heteroserve.Engine(model_path={str(tiny_model)!r}, platform='auto')\n"
        "print('TEXT:', engine.generate('The capital of France is', "
        "{'max_new_tokens': 8})['text'])\n"
        "engine.shutdown()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("TEXT:") == 1
