"""The scheduler against a fake model whose logits depend on the KV history it reads back
through the page table (tests/support/fake_runner.py): wrong pages, leaked or reused pages
and bad prefix matches all change outputs. Fast: no real model."""

from __future__ import annotations

import random

import pytest
import torch
from fake_runner import FakeModelRunner, reference_greedy
from heteroserve.core.config import ServerArgs
from heteroserve.core.scheduler import Req, Scheduler, StepOutput
from heteroserve.core.scheduler.sampling_params import SamplingParams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PREFIX = [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7]
PROMPTS = [PREFIX[: n % 12] + [(i * 7 + j) % 40 + 1 for j in range(n)]
           for i, n in enumerate((3, 17, 40, 9, 33, 12, 1, 20))]


def make(num_pages: int = 256, page_size: int = 4, eos: tuple[int, ...] = (), **kw
         ) -> tuple[Scheduler, FakeModelRunner]:
    runner = FakeModelRunner(num_pages=num_pages, page_size=page_size)
    return Scheduler(runner, ServerArgs(model_path="fake", **kw), list(eos), page_size), runner


def add(sched: Scheduler, prompts: list[list[int]], prefix: str = "r", **sampling) -> None:
    sampling.setdefault("max_new_tokens", 12)
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    for i, ids in enumerate(prompts):
        params = SamplingParams(**sampling)
        params.validate(sched.runner.vocab_size)  # as admission does before the scheduler
        sched.add_request(Req(rid=f"{prefix}{i}", input_ids=list(ids), sampling_params=params))


def drain(sched: Scheduler, on_step=None) -> tuple[dict[str, list[int]], dict[str, StepOutput]]:
    """Step until idle; returns output ids and the finishing StepOutput per request."""
    outs: dict[str, list[int]] = {}
    finals: dict[str, StepOutput] = {}
    for n in range(5_000):
        if not sched.has_work():
            return outs, finals
        for o in sched.step():
            assert o.rid not in finals, f"{o.rid} produced output after finishing"
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            if o.finish is not None:
                finals[o.rid] = o
        if on_step is not None:
            on_step(sched, n)
    raise AssertionError("scheduler did not become idle (livelock)")


def assert_no_leak(sched: Scheduler) -> None:
    """Idle, and every page is free or evictable: a request needing the whole pool runs
    (a leaked page or a lock never released would leave it waiting forever)."""
    stats = sched.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    prompt = [47] * (sched.max_total_tokens - 1)
    sched.add_request(Req(rid="whole-pool", input_ids=prompt, sampling_params=SamplingParams(
        max_new_tokens=1, temperature=0, ignore_eos=True)))
    _, finals = drain(sched)
    assert finals["whole-pool"].finish.to_sglang() == {"type": "length", "length": 1}


def expected(runner: FakeModelRunner, prompts: list[list[int]], n: int = 12) -> dict[str, list[int]]:
    return {f"r{i}": reference_greedy(runner, p, n) for i, p in enumerate(prompts)}


def test_batched_outputs_equal_the_model_run_alone() -> None:
    sched, runner = make()
    add(sched, PROMPTS)
    outs, finals = drain(sched)
    assert outs == expected(runner, PROMPTS)
    assert all(f.finish.to_sglang() == {"type": "length", "length": 12} for f in finals.values())
    assert finals["r2"].prompt_tokens == len(PROMPTS[2]) and finals["r2"].completion_tokens == 12
    assert_no_leak(sched)


@pytest.mark.parametrize("kw", [
    {"disable_radix_cache": True}, {"chunked_prefill_size": 5}, {"schedule_policy": "lpm"},
    {"max_running_requests": 2}, {"chunked_prefill_size": 3, "disable_radix_cache": True},
])
def test_scheduling_options_do_not_change_outputs(kw) -> None:
    sched, runner = make(**kw)
    add(sched, PROMPTS)
    peak = []
    outs, _ = drain(sched, lambda s, _: peak.append(len(s.running)))
    assert outs == expected(runner, PROMPTS)
    assert max(peak) <= sched.max_running_requests
    assert_no_leak(sched)


def test_radix_cache_counts_hits_and_cache_off_counts_none() -> None:
    shared = [list(range(1, 25)) + [30 + i] for i in range(4)]
    for disabled in (False, True):
        sched, runner = make(disable_radix_cache=disabled)
        add(sched, shared[:1], prefix="warm")
        drain(sched)
        add(sched, shared)
        outs, finals = drain(sched)
        assert outs == expected(runner, shared)
        stats = sched.get_stats()
        if disabled:
            assert stats["cache_hit_rate"] == 0 and stats["cached_tokens_total"] == 0
        else:
            assert all(f.cached_tokens == 24 for f in finals.values())
            assert stats["cached_tokens_total"] == 4 * 24 and stats["cache_hit_rate"] > 0.5
        assert_no_leak(sched)


def test_chunked_prefill_splits_long_prompts() -> None:
    sched, runner = make(chunked_prefill_size=8)
    add(sched, [list(range(1, 41))], max_new_tokens=3)
    drain(sched)
    first = [h[0] for h in runner.histories[:5]]
    assert [len(h) for h in first] == [8, 16, 24, 32, 40]  # five 8-token chunks


def test_tiny_pool_retracts_and_gives_identical_outputs() -> None:
    sched, runner = make(num_pages=31, page_size=4)
    prompts = [p for p in PROMPTS if len(p) + 24 <= 120]
    add(sched, prompts, max_new_tokens=24)
    outs, _ = drain(sched)
    assert sched.get_stats()["num_retractions"] > 0
    assert outs == expected(runner, prompts, 24)
    assert_no_leak(sched)


def test_sampling_is_seeded_per_request_and_survives_retraction() -> None:
    kw = {"temperature": 0.9, "top_p": 0.95, "top_k": 20, "max_new_tokens": 24}
    roomy, _ = make()
    add(roomy, PROMPTS[:6], seed=1234, **kw)
    tight, _ = make(num_pages=31)
    add(tight, PROMPTS[:6], seed=1234, **kw)
    alone, _ = make()
    add(alone, PROMPTS[:1], seed=1234, **kw)
    other, _ = make()
    add(other, PROMPTS[:1], seed=99, **kw)
    a, b, c, d = (drain(s)[0] for s in (roomy, tight, alone, other))
    assert tight.get_stats()["num_retractions"] > 0
    assert a == b and a["r0"] == c["r0"] and c["r0"] != d["r0"]


def test_unseeded_requests_derive_their_seed_from_random_seed() -> None:
    kw = {"temperature": 1.0, "max_new_tokens": 16}
    runs = []
    for engine_seed in (0, 0, 1):
        sched, _ = make(random_seed=engine_seed)
        add(sched, PROMPTS[:2], **kw)
        runs.append(drain(sched)[0])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_token_ids_eos_ignore_eos_and_max_new_tokens() -> None:
    prompt = [3, 1, 4, 1, 5]
    sched, runner = make()
    free = reference_greedy(runner, prompt, 10)
    stop = free[3]
    cut = free[: free.index(stop) + 1]
    cases = {
        "stop_ids": ((), {"stop_token_ids": [stop]}, cut, {"type": "stop", "matched": stop}),
        "eos": ((stop,), {"ignore_eos": False}, cut, {"type": "stop", "matched": stop}),
        "ignored": ((stop,), {"ignore_eos": True}, free, {"type": "length", "length": 10}),
        "short": ((), {"max_new_tokens": 2}, free[:2], {"type": "length", "length": 2}),
    }
    for name, (eos, sampling, want, reason) in cases.items():
        sched, _ = make(eos=eos)
        add(sched, [prompt], **{"max_new_tokens": 10, **sampling})
        outs, finals = drain(sched)
        assert outs["r0"] == want, name
        assert finals["r0"].finish.to_sglang() == reason, name
        assert_no_leak(sched)


def test_abort_waiting_and_running_frees_everything() -> None:
    sched, _ = make(max_running_requests=2, chunked_prefill_size=16)
    add(sched, PROMPTS, max_new_tokens=30)
    sched.step()
    sched.step()
    stats = sched.get_stats()
    assert stats["num_running"] == 2 and stats["num_waiting"] == 6
    for rid in ("r0", "r7"):  # fcfs: r0 holds KV, r7 is still queued
        (out,) = sched.abort(rid)
        assert out.rid == rid and out.finish.to_sglang() == {"type": "abort", "message": "aborted"}
    assert sched.abort("r0") == [] and sched.abort("nope") == []
    _, finals = drain(sched)
    assert "r0" not in finals and "r7" not in finals and len(finals) == 6
    assert_no_leak(sched)


@pytest.mark.parametrize("prompt_len, max_new", [(30, 10), (37, 3), (39, 1)])
def test_request_that_can_never_fit_is_rejected_and_one_that_exactly_fits_runs(
        prompt_len, max_new) -> None:
    sched, runner = make(num_pages=11, page_size=4)  # 40 slots
    with pytest.raises(ValueError, match="pool holds"):
        add(sched, [[1] * prompt_len], max_new_tokens=max_new + 1)
    add(sched, [list(range(1, prompt_len + 1))], max_new_tokens=max_new)
    outs, _ = drain(sched)
    assert outs["r0"] == reference_greedy(runner, list(range(1, prompt_len + 1)), max_new)
    assert_no_leak(sched)


def test_logprobs_and_top_logprobs_come_from_the_model_distribution() -> None:
    sched, runner = make()
    prompt = [5, 6, 7]
    sched.add_request(Req(rid="lp", input_ids=prompt, return_logprob=True, top_logprobs_num=3,
                          sampling_params=SamplingParams(max_new_tokens=4, temperature=0)))
    history = list(prompt)
    for _ in range(40):
        for o in sched.step():
            ref = torch.log_softmax(runner.logits_for(history), dim=-1)
            (token,) = o.new_token_ids
            assert o.logprobs == pytest.approx([ref[token].item()], abs=1e-5)
            vals, ids = ref.topk(3)
            assert [t for t, _ in o.top_logprobs[0]] == ids.tolist()
            assert [v for _, v in o.top_logprobs[0]] == pytest.approx(vals.tolist(), abs=1e-5)
            history.append(token)
        if not sched.has_work():
            break
    assert len(history) == 7


def test_a_request_that_fails_in_a_step_fails_alone() -> None:
    """Parameters that slipped past validation (a logit_bias key that is not a token id)
    end that request with an error finish; the batch and the scheduler go on."""
    sched, runner = make()
    add(sched, [[1, 2, 3]], max_new_tokens=6)
    sched.add_request(Req(rid="bad", input_ids=[4, 5], sampling_params=SamplingParams(
        max_new_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={"abc": 1.0})))
    outs, finals = drain(sched)
    assert finals["bad"].finish.kind.value == "error" and "penalties" in finals["bad"].finish.message
    assert outs["bad"] == [] and outs["r0"] == reference_greedy(runner, [1, 2, 3], 6)
    assert sched.allocator.num_used == sched.cache.cached_pages


def test_logit_bias_and_penalties_steer_greedy_decoding() -> None:
    sched, _ = make()
    add(sched, [[1, 2, 3]], logit_bias={"17": 100.0}, max_new_tokens=5)
    assert drain(sched)[0]["r0"] == [17] * 5
    kw = {"presence_penalty": 0.7, "frequency_penalty": 1.5, "repetition_penalty": 1.3,
          "logit_bias": {"17": 4.0, "3": -2.0}}
    prompt = [1, 2, 3, 17]
    sched, runner = make()
    add(sched, [prompt], max_new_tokens=20, **kw)
    got = drain(sched)[0]["r0"]
    ids, out = list(prompt), []  # reference: bias, then HF repetition, then OpenAI penalties
    for _ in range(20):
        logits = runner.logits_for(ids)
        logits[17] += 4.0
        logits[3] -= 2.0
        for t in set(ids):
            logits[t] = logits[t] / 1.3 if logits[t] > 0 else logits[t] * 1.3
        for t in set(out):
            logits[t] -= 1.5 * out.count(t) + 0.7
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    assert got == out
    plain, _ = make()
    add(plain, [prompt], max_new_tokens=20)
    assert drain(plain)[0]["r0"] != got  # the penalties mattered


def test_lpm_admits_the_longest_cached_prefix_first_and_fcfs_in_arrival_order() -> None:
    warm = list(range(1, 17))
    for policy, want in (("lpm", ["r2", "r1", "r0"]), ("fcfs", ["r0", "r1", "r2"])):
        sched, _ = make(schedule_policy=policy, max_running_requests=1)
        add(sched, [warm], prefix="warm", max_new_tokens=1)
        drain(sched)
        add(sched, [[40, 41, 42, 43, 44, 45], warm[:8] + [44], warm + [45]], max_new_tokens=3)
        first_token_order = []
        for _ in range(100):
            for o in sched.step():
                if o.rid not in first_token_order:
                    first_token_order.append(o.rid)
            if not sched.has_work():
                break
        assert first_token_order == want, policy


def test_get_stats_reports_the_pool() -> None:
    sched, _ = make()
    add(sched, PROMPTS[:3])
    sched.step()
    stats = sched.get_stats()
    for key in ("num_running", "num_waiting", "kv_used_pages", "kv_total_pages", "kv_usage",
                "cache_hit_rate", "cached_tokens_total", "prompt_tokens_total",
                "generation_tokens_total", "num_retractions"):
        assert key in stats, key
    assert stats["kv_total_pages"] == 255 and 0 < stats["kv_usage"] <= 1
    assert sched.max_total_tokens == 255 * 4 and sched.max_running_requests == 256


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10**6), num_pages=st.integers(14, 60), page=st.sampled_from([1, 2, 4]),
       chunk=st.integers(2, 40), radix=st.booleans(), lpm=st.booleans())
def test_random_workloads_match_the_model_and_leak_nothing(seed, num_pages, page, chunk,
                                                            radix, lpm) -> None:
    """Random prompts sharing prefixes, arrivals over time and aborts, under random pool
    sizes, page sizes and chunk sizes: every finished request equals the model run alone."""
    rng = random.Random(seed)
    sched, runner = make(num_pages=num_pages, page_size=page, chunked_prefill_size=chunk,
                         disable_radix_cache=not radix, schedule_policy="lpm" if lpm else "fcfs",
                         max_running_requests=rng.randint(1, 6))
    capacity = (num_pages - 1) * page
    bases = [[rng.randint(1, 40) for _ in range(rng.randint(0, 16))] for _ in range(3)]
    plan = []
    for i in range(rng.randint(1, 10)):
        prompt = rng.choice(bases) + [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
        n = rng.randint(1, 10)
        if rng.random() < 0.15:  # one that needs nearly the whole pool
            n = rng.randint(1, 4)
            prompt = [rng.randint(1, 40) for _ in range(capacity - n - rng.randint(0, 2))]
        if len(prompt) + n <= capacity:
            plan.append((rng.randint(0, 6), f"q{i}", prompt, n))
    aborts = {rid: rng.randint(0, 8) for _, rid, _, _ in plan if rng.random() < 0.2}
    prompts = {rid: (p, n) for _, rid, p, n in plan}

    def tick(s: Scheduler, step: int) -> list[StepOutput]:
        for when, rid, prompt, n in plan:
            if when == step + 1:
                s.add_request(Req(rid=rid, input_ids=prompt, sampling_params=SamplingParams(
                    max_new_tokens=n, temperature=0, ignore_eos=True)))
        return [o for rid, when in aborts.items() if when == step for o in s.abort(rid)]

    outs, finals = {}, {}
    pending = tick(sched, -1)
    for step in range(3_000):
        for o in pending + sched.step():
            assert o.rid not in finals
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
            if o.finish is not None:
                finals[o.rid] = o
        pending = tick(sched, step)
        if not sched.has_work() and step > 8:
            break
    else:
        raise AssertionError("livelock")
    for rid, fin in finals.items():
        prompt, n = prompts[rid]
        if fin.finish.kind.value == "abort":
            assert outs.get(rid, []) == reference_greedy(runner, prompt, n)[: len(outs.get(rid, []))]
        else:
            assert outs[rid] == reference_greedy(runner, prompt, n), rid
    assert set(finals) == set(prompts)
    assert_no_leak(sched)


def test_kv_usage_excludes_evictable_prefix_cache() -> None:
    """Busy: usage counts the pages requests hold. Idle with the prefix cache full of
    finished prompts: usage is 0 although those pages are still allocated (evictable)."""
    sched, _ = make()
    add(sched, PROMPTS[:4])
    sched.step()
    busy = sched.get_stats()
    assert busy["kv_usage"] > 0 and busy["kv_request_pages"] > 0
    drain(sched)
    idle = sched.get_stats()
    assert idle["kv_cached_pages"] > 0 and idle["kv_used_pages"] == idle["kv_cached_pages"]
    assert idle["kv_evictable_pages"] == idle["kv_cached_pages"]
    assert idle["kv_usage"] == 0 and idle["kv_request_pages"] == 0
    add(sched, PROMPTS[:1], prefix="again")  # a cache hit locks cached pages: they count
    sched.step()
    again = sched.get_stats()
    assert again["kv_evictable_pages"] < idle["kv_evictable_pages"] and again["kv_usage"] > 0
    assert again["prefix_cache_hits_total"] > 0
    assert again["prefix_cache_queries_total"] >= again["prefix_cache_hits_total"]


def test_queue_time_is_reported_once_scheduled() -> None:
    """Every output carries the seconds from add_request to the first scheduling step;
    a request that waits behind a full batch waits longer than the first."""
    sched, _ = make(max_running_requests=1)
    add(sched, PROMPTS[:2], max_new_tokens=3)
    _, finals = drain(sched)
    first, second = finals["r0"].queue_time, finals["r1"].queue_time
    assert first is not None and second is not None
    assert 0 <= first < second
