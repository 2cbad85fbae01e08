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
