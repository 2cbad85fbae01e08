"""lm-evaluation-harness's own ``local-completions`` model scores a local JSONL task through
the shared server; every loglikelihood it reports equals the one transformers computes for
the same model (echo + logprobs return the prompt's token logprobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from server_harness import API_KEY, MODEL_NAME

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "The quick brown fox", "continuation": "jumps over the lazy dog"},
    {"context": "Water boils at", "continuation": "one hundred degrees"},
    {"context": "What is the capital of France?", "continuation": "Paris."},
    {"context": "One two three", "continuation": "four five six"},
]


def _task(folder: Path) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "hs_local_ll.yaml").write_text(f"""task: hs_local_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def _reference(hf_model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    with torch.no_grad():
        logits = hf_model(torch.tensor([whole])).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    rows = range(len(ctx), len(whole))
    total = sum(float(lp[i - 1, whole[i]]) for i in rows)
    greedy = all(int(lp[i - 1].argmax()) == whole[i] for i in rows)
    return total, greedy


def test_local_completions_loglikelihoods_match_transformers(server, tiny_model, tmp_path,
                                                             monkeypatch) -> None:
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _task(tmp_path)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL_NAME, "base_url": f"{server.url}/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(tiny_model),
                    "tokenized_requests": True, "num_concurrent": 2,
                    "header": {"Authorization": f"Bearer {API_KEY}"},
                    "max_retries": 1},
        tasks=["hs_local_ll"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True, batch_size=2)
    samples = results["samples"]["hs_local_ll"]
    assert len(samples) == len(DOCS)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    lls = []
    for sample in samples:
        context, continuation = sample["arguments"][0]
        (ll, greedy), = sample["resps"][0] if isinstance(sample["resps"][0][0], (list, tuple)) \
            else [sample["resps"][0]]
        want_ll, want_greedy = _reference(hf, tok, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-3), (context, continuation)
        assert bool(greedy) == want_greedy
        lls.append(want_ll)
    assert all(ll < -1.0 for ll in lls)  # random weights: far from a perfect score
    ppl = results["results"]["hs_local_ll"]["perplexity,none"]
    assert ppl > 1.5


def test_local_chat_completions_generates_what_the_server_answers(server, http, tmp_path,
                                                                  monkeypatch) -> None:
    """lm-eval's ``local-chat-completions`` runs a ``generate_until`` task through
    ``/v1/chat/completions``; each response is the server's greedy chat reply."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "hs_local_chat.yaml").write_text(f"""task: hs_local_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
generation_kwargs:
  until: ["<never>"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={"model": MODEL_NAME, "base_url": f"{server.url}/v1/chat/completions",
                    "num_concurrent": 2, "max_retries": 1,
                    "header": {"Authorization": f"Bearer {API_KEY}"}},
        tasks=["hs_local_chat"], task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True, log_samples=True)
    samples = results["samples"]["hs_local_chat"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        context = sample["doc"]["context"]
        want = http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": context}],
            "max_tokens": 6, "temperature": 0, "stop": ["<never>"]}).json()
        assert sample["resps"][0][0] == want["choices"][0]["message"]["content"], context
    assert "exact_match,none" in results["results"]["hs_local_chat"]
