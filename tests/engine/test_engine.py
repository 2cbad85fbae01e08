"""``heteroserve.Engine`` end to end (scheduler process, ZMQ, detokenizer) against
transformers and against itself. One engine is shared by the module; the last test shuts it
down and checks that no child process is left."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from engine_harness import ChildWatch
import torch

from heteroserve import Engine
from heteroserve.core.runtime.errors import RequestError

GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "Hello, world! How are you", "def main():",
           "One two three four", "Water boils at", "A serving engine schedules requests",
           "{\"name\": \"Ada\"", "Paris is the capital"]


@pytest.fixture(scope="module")
def child_watch() -> ChildWatch:
    return ChildWatch()


@pytest.fixture(scope="module")
def engine(tiny_model: Path, engine_kwargs: dict, child_watch: ChildWatch):
    e = Engine(str(tiny_model), **engine_kwargs)
    yield e
    e.shutdown()


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def test_generate_single_batch_and_input_ids(engine: Engine) -> None:
    out = engine.generate(PROMPTS[0], GREEDY)
    assert isinstance(out, dict) and set(out) >= {"text", "output_ids", "meta_info"}
    assert len(out["output_ids"]) == 16
    assert out["text"] == engine.tokenizer.decode(out["output_ids"])
    batch = engine.generate(PROMPTS[:2], GREEDY)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == out["output_ids"]
    by_ids = engine.generate(input_ids=engine.tokenizer.encode(PROMPTS[0]), sampling_params=GREEDY)
    assert by_ids["output_ids"] == out["output_ids"]
    by_ids_batch = engine.generate(input_ids=[engine.tokenizer.encode(p) for p in PROMPTS[:2]],
                                   sampling_params=[GREEDY, {**GREEDY, "max_new_tokens": 3}])
    assert [len(o["output_ids"]) for o in by_ids_batch] == [16, 3]


def test_meta_info_fields(engine: Engine) -> None:
    out = engine.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 5}, rid="meta-test")
    meta = out["meta_info"]
    assert meta["id"] == "meta-test"
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[1]))
    assert meta["completion_tokens"] == len(out["output_ids"]) == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert isinstance(meta["cached_tokens"], int) and meta["cached_tokens"] >= 0
    assert meta["e2e_latency"] > 0
    assert "output_token_logprobs" not in meta


def test_greedy_matches_transformers(engine: Engine, hf_model) -> None:
    for prompt in PROMPTS[:3]:
        ids = engine.tokenizer.encode(prompt)
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert out["output_ids"] == _hf_greedy(hf_model, ids, 16), prompt


def test_concurrent_requests_equal_each_alone(engine: Engine) -> None:
    together = engine.generate(PROMPTS, GREEDY)
    alone = [engine.generate(p, GREEDY) for p in PROMPTS]
    assert [o["output_ids"] for o in together] == [o["output_ids"] for o in alone]
    assert [o["text"] for o in together] == [o["text"] for o in alone]


def test_seed_determinism(engine: Engine) -> None:
    params = {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True}
    a = engine.generate(PROMPTS[0], {**params, "seed": 7})
    b = engine.generate(PROMPTS[0], {**params, "seed": 7})
    c = engine.generate(PROMPTS[0], {**params, "seed": 8})
    assert a["text"] == b["text"] and a["output_ids"] == b["output_ids"]
    assert a["output_ids"] != c["output_ids"]


def test_stop_string_never_leaks(engine: Engine) -> None:
    tok = engine.tokenizer
    first = engine.generate(PROMPTS[3], {**GREEDY, "max_new_tokens": 24})
    ids, text = first["output_ids"], first["text"]
    stop = tok.decode(ids[6:9])  # spans three tokens
    assert stop.strip() and "\ufffd" not in stop and stop in text
    expected = text[:text.index(stop)]
    params = {**GREEDY, "max_new_tokens": 24, "stop": [stop]}
    out = engine.generate(PROMPTS[3], params)
    assert out["text"] == expected
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = engine.generate(PROMPTS[3], {**params, "no_stop_trim": True})
    assert kept["text"] == expected + stop
    chunks = list(engine.generate(PROMPTS[3], params, stream=True))
    assert chunks[-1]["text"] == expected
    for chunk in chunks:
        assert stop not in chunk["text"] and expected.startswith(chunk["text"])


def test_stop_token_ids(engine: Engine) -> None:
    first = engine.generate(PROMPTS[4], GREEDY)
    ids = first["output_ids"]
    target = ids[5]
    k = ids.index(target)
    out = engine.generate(PROMPTS[4], {**GREEDY, "stop_token_ids": [target]})
    assert out["output_ids"] == ids[:k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert out["text"] == engine.tokenizer.decode(ids[:k])  # the stop token's text is trimmed


def test_logprobs_match_reference(engine: Engine, hf_model) -> None:
    ids = engine.tokenizer.encode(PROMPTS[5])
    out = engine.generate(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 6},
                          return_logprob=True, top_logprobs_num=3)
    meta = out["meta_info"]
    chosen, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
    assert len(chosen) == len(tops) == 6
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + out["output_ids"][:-1]])).logits[0]
    ref = torch.log_softmax(logits[len(ids) - 1:].double(), dim=-1)
    for pos, ((lp, tid, text), top) in enumerate(zip(chosen, tops)):
        assert tid == out["output_ids"][pos] and isinstance(text, str)
        assert lp == pytest.approx(float(ref[pos, tid]), abs=1e-3)
        assert len(top) == 3
        ref_vals, ref_ids = ref[pos].topk(3)
        assert [t[1] for t in top] == ref_ids.tolist()
        assert [t[0] for t in top] == pytest.approx(ref_vals.tolist(), abs=1e-3)
        assert top[0][1] == tid  # greedy picks the best alternative


def test_n_choices_share_the_prompt(engine: Engine) -> None:
    prompt = "Numbers and letters: " + " ".join(str(i) for i in range(40))  # a fresh prompt
    assert len(engine.tokenizer.encode(prompt)) > 2 * engine.info.page_size
    outs = engine.generate(prompt, {**GREEDY, "max_new_tokens": 4, "n": 2})
    assert [o["index"] for o in outs] == [0, 1]
    assert outs[0]["output_ids"] == outs[1]["output_ids"]
    assert outs[0]["meta_info"]["cached_tokens"] == 0
    assert outs[1]["meta_info"]["cached_tokens"] >= engine.info.page_size


def test_streaming(engine: Engine) -> None:
    full = engine.generate(PROMPTS[6], GREEDY)
    chunks = list(engine.generate(PROMPTS[6], GREEDY, stream=True))
    assert len(chunks) >= 2
    assert [c["meta_info"]["finish_reason"] is not None for c in chunks] == \
        [False] * (len(chunks) - 1) + [True]
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"])
        assert b["output_ids"][:len(a["output_ids"])] == a["output_ids"]
    assert chunks[-1]["output_ids"] == full["output_ids"] and chunks[-1]["text"] == full["text"]


def test_async_generate(engine: Engine) -> None:
    full = engine.generate(PROMPTS[7], GREEDY)

    async def main() -> tuple[dict, list[dict]]:
        out = await engine.async_generate(PROMPTS[7], GREEDY)
        stream = await engine.async_generate(PROMPTS[7], GREEDY, stream=True)
        return out, [c async for c in stream]

    out, chunks = asyncio.run(main())
    assert out["output_ids"] == full["output_ids"]
    assert chunks[-1]["output_ids"] == full["output_ids"]


def test_abort(engine: Engine) -> None:
    params = {"temperature": 0.0, "max_new_tokens": 1500, "ignore_eos": True}
    chunks = []
    for chunk in engine.generate(PROMPTS[0], params, stream=True, rid="to-abort"):
        chunks.append(chunk)
        if len(chunks) == 3:
            engine.abort("to-abort")
    meta = chunks[-1]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 1500

    async def abort_n(after_chunks: int) -> list[dict]:
        rid = f"abort-n-{after_chunks}"
        stream = await engine.async_generate(PROMPTS[1], {**params, "n": 2}, stream=True,
                                             rid=rid)
        finals, seen = {}, 0
        if after_chunks == 0:  # abort before choice 0 was even prefilled
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)
            engine.abort(rid)
            out = await first
            seen += 1
            if out["meta_info"]["finish_reason"]:
                finals[out["index"]] = out
        async for out in stream:
            seen += 1
            if seen == after_chunks:
                engine.abort(rid)
            if out["meta_info"]["finish_reason"]:
                finals[out["index"]] = out
        return [finals[i] for i in sorted(finals)]

    for after in (0, 4):
        finals = asyncio.run(asyncio.wait_for(abort_n(after), 30))
        assert [f["index"] for f in finals] == [0, 1]
        assert all(f["meta_info"]["finish_reason"]["type"] == "abort" for f in finals)
    assert engine.get_stats()["num_inflight"] == 0
    assert engine.generate(PROMPTS[0], {**GREEDY, "max_new_tokens": 2})["output_ids"]


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"prompt": "hi", "sampling_params": {"temprature": 0.5}}, "temprature"),
    ({"prompt": "hi", "sampling_params": {"top_p": 0}}, "top_p"),
    ({"prompt": "hi", "sampling_params": {"n": 0}}, "n must be"),
    ({"prompt": ""}, "empty"),
    ({"input_ids": [1, 99999]}, "outside the vocabulary"),
    ({"input_ids": [5] * 3000}, "context window"),
    ({"prompt": "hi", "sampling_params": {"max_new_tokens": 5000}}, "context window"),
    ({"prompt": "hi", "sampling_params": {"regex": "[unclosed"}}, "regex"),
    ({"prompt": "hi", "input_ids": [1]}, "exactly one"),
])
def test_bad_requests_raise_one_line_and_engine_keeps_working(engine: Engine, kwargs: dict,
                                                              match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        engine.generate(**kwargs)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert len(engine.generate("hi", {**GREEDY, "max_new_tokens": 2})["output_ids"]) == 2


def test_structured_output_follows_the_regex(engine: Engine) -> None:
    out = engine.generate("Pick a number:", {"temperature": 0.0, "max_new_tokens": 8,
                                             "regex": "[0-9]{3}"})
    assert out["text"].isdigit() and len(out["text"]) == 3


def test_encode_matches_transformers_hidden_states(engine: Engine, hf_model) -> None:
    ids = engine.tokenizer.encode(PROMPTS[5])
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0].double()
    one = engine.encode(PROMPTS[5])
    assert one["meta_info"]["prompt_tokens"] == len(ids)
    want = torch.nn.functional.normalize(hidden[-1], dim=0)
    assert (torch.tensor(one["embedding"], dtype=torch.float64) - want).abs().max() < 1e-4
    batch = engine.encode(input_ids=[ids, ids[:3]], pooling="mean", normalize=False)
    assert (torch.tensor(batch[0]["embedding"], dtype=torch.float64)
            - hidden.mean(0)).abs().max() < 1e-4
    assert len(batch) == 2 and batch[1]["meta_info"]["prompt_tokens"] == 3
    with pytest.raises(RequestError, match="pooling"):
        engine.encode("hi", pooling="cls")
    with pytest.raises(RequestError, match="maximum"):
        engine.encode(input_ids=[5] * 3000)


def test_health_generate_and_stats(engine: Engine) -> None:
    assert asyncio.run(engine.client.health_generate(timeout=30))
    stats = engine.get_stats()
    assert stats["num_requests_total"] >= 10 and stats["generation_tokens_total"] > 0
    assert stats["max_total_tokens"] == engine.info.max_total_tokens
    assert 0.0 <= stats["kv_usage"] <= 1.0 and "cache_hit_rate" in stats
    assert stats["num_inflight"] == 0


def test_shutdown_leaves_no_child_processes(engine: Engine, child_watch: ChildWatch) -> None:
    pid = engine.client.supervisor.procs[0].pid
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert not engine.client.is_alive()
    assert child_watch.new_live() == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
