"""Stops, aborts, penalties and validation."""

from __future__ import annotations

import pytest
import torch

from engine_harness import cpu_args, run_scheduler
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.scheduler import Req, Scheduler
from heteroserve.core.scheduler.batch_sampling import apply_penalties
from heteroserve.core.scheduler.sampling_params import SamplingParams, SamplingParamsError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=5)
    args = cpu_args(path)
    _, _, runner = build_model_runner(args)
    return args, runner


def test_stop_token_ids_eos_and_length(setup) -> None:
    args, runner = setup
    free_run, _ = run_scheduler(args, [[7, 8, 9]], runner=runner, max_new_tokens=10)
    stop_at = free_run["r0"][3]
    stopped, _ = run_scheduler(args, [[7, 8, 9]], runner=runner, max_new_tokens=10,
                               stop_token_ids=[stop_at])
    assert stopped["r0"] == free_run["r0"][: free_run["r0"].index(stop_at) + 1]
    eos_stop, _ = run_scheduler(args, [[7, 8, 9]], eos=[stop_at], runner=runner,
                                max_new_tokens=10, ignore_eos=False)
    assert eos_stop["r0"][-1] == stop_at
    ignored, _ = run_scheduler(args, [[7, 8, 9]], eos=[stop_at], runner=runner,
                               max_new_tokens=10, ignore_eos=True)
    assert len(ignored["r0"]) == 10


@pytest.mark.parametrize("stop_kind", ["stop_token_ids", "eos"])
def test_min_new_tokens_holds_back_stops(setup, stop_kind: str) -> None:
    """Below ``min_new_tokens`` outputs the stop token cannot be sampled (greedy takes the
    runner-up), so the run differs from the free one exactly where the stop token was; EOS
    is held back the same way, and it ends the request once the minimum is reached."""
    args, runner = setup
    free_run, _ = run_scheduler(args, [[7, 8, 9]], runner=runner, max_new_tokens=10)
    stop_at = free_run["r0"][3]
    first = free_run["r0"].index(stop_at)
    stops = ({"stop_token_ids": [stop_at]} if stop_kind == "stop_token_ids"
             else {"eos": [stop_at], "ignore_eos": False})
    held, _ = run_scheduler(args, [[7, 8, 9]], runner=runner, max_new_tokens=10,
                            min_new_tokens=first + 2, **stops)
    out = held["r0"]
    assert out[:first] == free_run["r0"][:first]
    assert stop_at not in out[:first + 2]
    assert len(out) == 10 or (len(out) > first + 2 and out[-1] == stop_at)
    ignored, _ = run_scheduler(args, [[7, 8, 9]], runner=runner, max_new_tokens=10,
                               min_new_tokens=first + 2, eos=[stop_at], ignore_eos=True)
    assert ignored["r0"] == free_run["r0"]  # EOS ignored: nothing to hold back


def test_min_new_tokens_masks_only_below_the_minimum() -> None:
    sp = SamplingParams(min_new_tokens=2, stop_token_ids=[1])
    req = Req(rid="m", input_ids=[0], sampling_params=sp)
    req.output_ids = [4]
    logits = torch.zeros(2, 5)
    other = Req(rid="o", input_ids=[0], sampling_params=SamplingParams())
    assert apply_penalties(logits, [req, other], eos=[3, 99]) == {}  # ids past vocab ignored
    assert logits[0].tolist() == [0.0, float("-inf"), 0.0, float("-inf"), 0.0]
    assert logits[1].tolist() == [0.0] * 5
    req.output_ids = [4, 4]
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [req], eos=[3])
    assert logits[0].tolist() == [0.0] * 5


def test_allowed_token_ids_leave_only_those_logits() -> None:
    req = Req(rid="a", input_ids=[0], sampling_params=SamplingParams(allowed_token_ids=[1, 3]))
    logits = torch.arange(5.0).view(1, 5)
    assert apply_penalties(logits, [req]) == {}
    assert logits[0].tolist() == [float("-inf"), 1.0, float("-inf"), 3.0, float("-inf")]


def test_abort_frees_everything(setup) -> None:
    args, runner = setup
    sched = Scheduler(runner, args, [], runner.page_size)
    for i in range(3):
        sched.add_request(Req(rid=f"a{i}", input_ids=list(range(5, 40)),
                              sampling_params=SamplingParams(max_new_tokens=50, temperature=0)))
    sched.step()
    sched.step()
    outs = sched.abort("a1") + sched.abort("a0") + sched.abort("a2") + sched.abort("zzz")
    assert [o.finish.kind.value for o in outs] == ["abort"] * 3
    assert not sched.has_work()
    assert sched.allocator.num_free + sched.cache.cached_pages == sched.allocator.capacity


def test_request_that_cannot_fit_is_rejected(setup) -> None:
    args, runner = setup
    sched = Scheduler(runner, args, [], runner.page_size)
    with pytest.raises(ValueError, match="pool holds"):
        sched.add_request(Req(rid="big", input_ids=[1] * 10,
                              sampling_params=SamplingParams(max_new_tokens=10**6)))


@pytest.mark.parametrize("params, needle", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": "hot"}, "number"),
    ({"temperature": float("nan")}, "finite"), ({"top_p": float("inf")}, "finite"),
    ({"seed": 2 ** 63}, "seed"), ({"seed": 2 ** 70}, "seed"), ({"seed": 1.5}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"99": 1}}, "logit_bias"),
    ({"logit_bias": {"1": float("nan")}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 65}, "stop"), ({"stop_token_ids": [99]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"min_new_tokens": -1}, "min_new_tokens"), ({"min_new_tokens": 1.5}, "min_new_tokens"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
    ({"min_new_tokens": 2, "regex": "[a-z]+"}, "min_new_tokens"),
    ({"min_new_tokens": 2, "json_object": True}, "min_new_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [50]}, "allowed_token_ids"),
    ({"allowed_token_ids": [1], "regex": "a"}, "allowed_token_ids"),
])
def test_validation(params, needle) -> None:
    with pytest.raises(SamplingParamsError, match=needle) as info:
        SamplingParams.from_dict(params).validate(vocab_size=50)
    assert info.value.param == needle or needle in ("number", "finite")
    with pytest.raises(SamplingParamsError, match="bogus"):
        SamplingParams.from_dict({"bogus": 1})


def test_validation_normalises_logit_bias_keys() -> None:
    sp = SamplingParams(logit_bias={"3": 2, 4: -100, " 5 ": 0.5}, seed=-(2 ** 63))
    sp.validate(vocab_size=50)
    assert sp.logit_bias == {3: 2.0, 4: -100.0, 5: 0.5}


def test_penalties_match_reference() -> None:
    req = Req(rid="p", input_ids=[1, 2], sampling_params=SamplingParams(
        frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.5))
    req.output_ids = [2, 3, 3]
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 5.0]])
    apply_penalties(logits, [req])
    expected = torch.tensor([[1.0, 2.0 / 1.5, -2.0 * 1.5 - 0.5 - 0.25, 4.0 / 1.5 - 1.0 - 0.25, 5.0]])
    assert torch.allclose(logits, expected)
