"""Sampling: greedy, filters, exactness of masking, batch-independent determinism, and the
empirical distribution."""

from __future__ import annotations

import pytest
import torch

from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.platforms.cpu.sampling import counter_uniform, sample


def _params(b: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0, seeds: torch.Tensor | None = None, step: int = 0,
            all_greedy: bool = False) -> SamplingBatch:
    return SamplingBatch(
        temperatures=torch.full((b,), temperature),
        top_ks=torch.full((b,), top_k, dtype=torch.int32),
        top_ps=torch.full((b,), top_p), min_ps=torch.full((b,), min_p),
        seeds=seeds if seeds is not None else torch.arange(b, dtype=torch.int64),
        steps=torch.full((b,), step, dtype=torch.int64), all_greedy=all_greedy)


def test_greedy_is_argmax_lowest_id_on_ties() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = logits[2, 30] = 100.0
    want = [int(row.tolist().index(max(row.tolist()))) for row in logits]
    assert sample(logits, _params(6, temperature=0.0)).tolist() == want
    assert sample(logits, _params(6, all_greedy=True)).tolist() == want
    assert want[2] == 7


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(1))
    want = logits.argmax(-1)
    assert torch.equal(sample(logits, _params(32, temperature=1.5, top_k=1)), want)
    assert torch.equal(sample(logits, _params(32, temperature=1.0, top_p=1e-6)), want)


def test_masked_tokens_never_drawn() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(512, 64, generator=gen)
    masked = torch.rand(512, 64, generator=gen) < 0.9
    masked[:, 0] = False
    logits[masked] = float("-inf")
    logits[:, 0] = -50.0  # the only allowed token is also very unlikely
    for temperature, top_p in ((5.0, 1.0), (1.0, 0.3), (100.0, 0.99)):
        tokens = sample(logits, _params(512, temperature=temperature, top_p=top_p, step=3))
        assert not masked.gather(1, tokens[:, None]).any()


def test_same_seed_and_step_same_token_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 1000, generator=gen)
    params = SamplingBatch(
        temperatures=torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 2.0, 0.9, 1.0]),
        top_ks=torch.tensor([0, 50, 0, 5, 0, 0, 20, 0], dtype=torch.int32),
        top_ps=torch.tensor([1.0, 0.9, 1.0, 1.0, 0.5, 1.0, 0.8, 1.0]),
        min_ps=torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.05, 0.0, 0.0]),
        seeds=torch.tensor([11, 12, 13, 2**40 + 5, -7, 11, 99, 11], dtype=torch.int64),
        steps=torch.tensor([0, 4, 9, 1, 2, 3, 4, 5], dtype=torch.int64))
    full = sample(logits, params)
    for order in ([7, 3, 0], [5], list(range(8))[::-1]):
        idx = torch.tensor(order)
        sub = SamplingBatch(*(getattr(params, f)[idx] for f in
                              ("temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps")))
        assert sample(logits[idx], sub).tolist() == full[idx].tolist()
    # changing the step or the seed changes the stream
    draws = {sample(logits[:1], _params(1, seeds=torch.tensor([5]), step=s)).item()
             for s in range(20)}
    assert len(draws) > 5


def test_noise_is_uniform_and_keyed() -> None:
    u = counter_uniform(torch.tensor([1, 2], dtype=torch.int64), torch.tensor([0, 0]), 200_000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003
    assert not torch.equal(u[0], u[1])
    u2 = counter_uniform(torch.tensor([1], dtype=torch.int64), torch.tensor([1]), 200_000)
    assert (u2[0] == u[0]).float().mean() < 1e-3


PROBS = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])


@pytest.mark.parametrize("kwargs,expected", [
    ({}, PROBS),
    ({"top_k": 2}, torch.tensor([0.625, 0.375, 0, 0, 0])),
    ({"top_p": 0.85}, torch.tensor([5 / 9, 3 / 9, 1 / 9, 0, 0])),
    ({"min_p": 0.15}, torch.tensor([0.5, 0.3, 0.1, 0, 0]) / 0.9),
    ({"top_k": 3, "top_p": 0.7}, torch.tensor([0.625, 0.375, 0, 0, 0])),
    ({"temperature": 0.5}, PROBS ** 2 / (PROBS ** 2).sum()),
])
def test_empirical_distribution(kwargs: dict, expected: torch.Tensor) -> None:
    n = 20000
    logits = PROBS.log().expand(n, -1).contiguous()
    tokens = sample(logits, _params(n, seeds=torch.arange(n, dtype=torch.int64) * 7919, step=1,
                                    **kwargs))
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert torch.all(freq[expected == 0] == 0)
    torch.testing.assert_close(freq, expected.double(), atol=0.015, rtol=0)


def test_one_request_over_many_steps_follows_the_distribution() -> None:
    n = 20000
    logits = PROBS.log().expand(n, -1).contiguous()
    params = _params(n, seeds=torch.full((n,), 1234, dtype=torch.int64))
    params.steps = torch.arange(n, dtype=torch.int64)
    freq = torch.bincount(sample(logits, params), minlength=5).double() / n
    torch.testing.assert_close(freq, PROBS.double(), atol=0.015, rtol=0)


def test_parameter_shape_errors() -> None:
    params = _params(3)
    with pytest.raises(ValueError, match="top_ks"):
        sample(torch.zeros(3, 10), SamplingBatch(params.temperatures, params.top_ks[:2],
                                                 params.top_ps, params.min_ps, params.seeds,
                                                 params.steps))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(10), params)
