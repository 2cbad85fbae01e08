"""Triton token-bitmask apply (exact) and sampling (greedy exactness, filter supports,
-inf never drawn, determinism, batch-composition independence, the drawn distribution)."""

from __future__ import annotations

import pytest
import torch

from heteroserve.core.kernels.ops import SamplingBatch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows,vocab,words,indexed", [(3, 100, 4, False), (4, 1100, 30, True),
                                                      (2, 70, 1, False)])
def test_bitmask(device: torch.device, rows: int, vocab: int, words: int, indexed: bool) -> None:
    from heteroserve.platforms.triton.bitmask import apply_token_bitmask

    g = _gen(vocab)
    logits = torch.randn(rows, vocab, generator=g)
    bits = torch.randint(0, 2, (rows, words * 32), generator=g, dtype=torch.int64)
    weights = (1 << torch.arange(32, dtype=torch.int64))
    packed = (bits.view(rows, words, 32) * weights).sum(-1)
    packed = (packed - ((packed >> 31) & 1) * (1 << 32)).to(torch.int32)
    indices = torch.randperm(rows, generator=g) if indexed else None
    out = logits.clone().to(device)
    apply_token_bitmask(out, packed.to(device),
                        indices.to(device, torch.int32) if indexed else None)
    ref = logits.clone()
    allowed = torch.zeros(rows, vocab, dtype=torch.bool)
    width = min(vocab, words * 32)
    allowed[:, :width] = bits[:, :width].bool()
    target = indices if indexed else torch.arange(rows)
    ref[target] = torch.where(allowed, logits[target], float("-inf"))
    assert torch.equal(out.cpu(), ref)


def _params(b: int, temp: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
            seed0: int = 0, step: int = 0) -> SamplingBatch:
    return SamplingBatch(
        temperatures=torch.full((b,), temp), top_ks=torch.full((b,), top_k, dtype=torch.int32),
        top_ps=torch.full((b,), top_p), min_ps=torch.full((b,), min_p),
        seeds=torch.arange(seed0, seed0 + b, dtype=torch.int64),
        steps=torch.full((b,), step, dtype=torch.int64))


def _to(p: SamplingBatch, device: torch.device) -> SamplingBatch:
    return SamplingBatch(*(getattr(p, f).to(device) for f in (
        "temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps")), all_greedy=p.all_greedy)


def test_greedy_rows_and_ties(device: torch.device) -> None:
    from heteroserve.platforms.triton.sampling import sample

    logits = torch.randn(4, 3000, generator=_gen(0))
    logits[1, 5] = logits[1, 2900] = 50.0  # tie: the lower id wins
    p = _params(4, 0.0)
    p.temperatures[3] = 1.0  # one sampled row in the batch: greedy rows still exact
    ids = sample(logits.to(device), _to(p, device)).cpu()
    assert ids[:3].tolist() == [int(logits[0].argmax()), 5, int(logits[2].argmax())]
    p.all_greedy, p.temperatures[3] = True, 0.0
    logits[2] = float("-inf")  # an all -inf row gives 0, a -inf token is never chosen
    logits[3, :2999] = float("-inf")
    ids = sample(logits.to(device), _to(p, device)).cpu()
    assert ids.tolist() == [int(logits[0].argmax()), 5, 0, 2999]


def test_filters_neg_inf_and_determinism(device: torch.device) -> None:
    from heteroserve.platforms.triton.sampling import sample

    b, v = 16, 50
    logits = torch.randn(b, v, generator=_gen(1)) * 2
    logits[:, ::3] = float("-inf")
    for kwargs in ({}, {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.3}, {"top_k": 1}):
        p = _params(b, 0.8, **kwargs)
        ids = sample(logits.to(device), _to(p, device)).cpu()
        assert torch.equal(ids, sample(logits.to(device), _to(p, device)).cpu())
        assert bool(torch.isfinite(logits[torch.arange(b), ids]).all())
        probs = torch.softmax(logits.double() / 0.8, -1)
        chosen = probs[torch.arange(b), ids]
        rank = (probs > chosen[:, None]).sum(-1)
        if "top_k" in kwargs:
            assert int(rank.max()) < kwargs["top_k"]
        if "top_p" in kwargs:
            mass_before = (probs * (probs > chosen[:, None])).sum(-1)
            assert float(mass_before.max()) < 0.5 + 1e-6
        if "min_p" in kwargs:
            assert bool((chosen >= 0.3 * probs.max(-1).values - 1e-6).all())
        if kwargs.get("top_k") == 1:
            assert torch.equal(ids, logits.argmax(-1))


def test_batch_independence(device: torch.device) -> None:
    from heteroserve.platforms.triton.sampling import sample

    logits = torch.randn(6, 2500, generator=_gen(2))
    p = _params(6, 1.3, top_p=0.9, seed0=100, step=7)
    full = sample(logits.to(device), _to(p, device)).cpu()
    sub = SamplingBatch(*(getattr(p, f)[[4, 1]] for f in (
        "temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps")))
    part = sample(logits[[4, 1]].to(device), _to(sub, device)).cpu()
    assert part.tolist() == [full[4].item(), full[1].item()]
    p2 = _params(6, 1.3, top_p=0.9, seed0=100, step=8)  # another step: other draws
    assert not torch.equal(full, sample(logits.to(device), _to(p2, device)).cpu())


def test_distribution(device: torch.device) -> None:
    """500 rows (seeds) over a 4-token distribution: frequencies within 5 sigma."""
    from heteroserve.platforms.triton.sampling import sample

    n = 500
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).repeat(n, 1)
    ids = sample(logits.to(device), _to(_params(n, 1.0, step=3), device)).cpu()
    freq = torch.bincount(ids, minlength=4).double() / n
    expect = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sigma = (expect * (1 - expect) / n).sqrt()
    assert bool(((freq - expect).abs() < 5 * sigma).all()), freq
