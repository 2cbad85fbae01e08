"""Torch-native sampling (contract: ``SamplingOp`` in ``core/kernels/ops.py``).

Randomness is counter based: the noise of token ``i`` in a row is a pure function of the
row's ``(seed, step)`` and ``i``, computed with int64 tensor ops, so a request draws the same
tokens whatever else is in the batch and on whatever device. A draw is the Gumbel-max trick
(equivalently ``argmax(p / E)`` with ``E ~ Exp(1)``) over the kept tokens, which samples
exactly from the renormalised kept distribution.

Filters, each evaluated on the temperature-scaled distribution ``p`` of the whole row and
then intersected (SGLang's semantics): top-k keeps the ``k`` most likely tokens (ties: lower
id); top-p keeps the tokens whose preceding mass in descending order is ``< p`` (the smallest
prefix reaching ``p``, never empty); min-p keeps ``p >= min_p * max(p)``. Tokens with
``-inf`` logits are never kept.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.ops import SamplingBatch

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
# Odd multipliers below 2^31: a product with a 32-bit value stays below 2^63, so int64
# arithmetic never overflows and masking to 32 bits gives the exact product mod 2^32.
_MUL_A = 0x7FEB352D
_MUL_B = 0x21F0AAAD
_COLUMN_SALT = 0x85EBCA6B


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xorshift-multiply, "lowbias32" shape) of int64 values in
    ``[0, 2^32)``, in place on ``x`` (which is returned)."""
    x ^= x >> 16
    x *= _MUL_A
    x &= _MASK32
    x ^= x >> 15
    x *= _MUL_B
    x &= _MASK32
    x ^= x >> 16
    return x


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from the full 64 bits of ``seed`` and ``step``."""
    key = torch.zeros(seeds.shape, dtype=torch.int64, device=seeds.device)
    for word in (seeds, steps):
        word = word.to(torch.int64)
        for part in (word & _MASK32, (word >> 32) & _MASK32):
            key = _mix32(key ^ _mix32(part ^ _GOLDEN32))
    return key


def _column_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    return _mix32(torch.arange(vocab, device=device, dtype=torch.int64) ^ _COLUMN_SALT)


def counter_bits(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """32 random bits per element, int64 ``[B, vocab]`` in ``[0, 2^32)``: element ``(b, i)``
    depends only on ``(seeds[b], steps[b], i)``."""
    keys = _row_keys(seeds, steps)[:, None]
    return _mix32(keys ^ _column_hashes(vocab, seeds.device)[None, :])


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in the open interval (0, 1), float64 ``[B, vocab]``, keyed like
    :func:`counter_bits`."""
    u = counter_bits(seeds, steps, vocab).to(torch.float64)
    return u.add_(0.5).mul_(1.0 / 4294967296.0)


def _keep_mask(probs: torch.Tensor, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Tokens passing every active filter (bool ``[B, V]``); see the module docstring."""
    vocab = probs.shape[-1]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    top_k = params.top_ks.to(torch.int64)[:, None]
    keep_sorted = (top_k <= 0) | (rank < top_k)
    mass_before = torch.cumsum(sorted_p.to(torch.float64), dim=-1) - sorted_p.to(torch.float64)
    top_p = params.top_ps.to(torch.float64)[:, None]
    keep_sorted &= (top_p >= 1.0) | (mass_before < top_p) | (rank == 0)
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    min_p = params.min_ps.to(torch.float32)[:, None]
    keep &= probs >= min_p * sorted_p[:, :1]
    return keep & (logits > float("-inf"))


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token per row of ``logits`` fp32 ``[B, V]``; returns int64 ``[B]``.

    Rows with temperature 0 take the argmax (lowest id on ties). Other rows sample from the
    temperature-scaled distribution restricted by top-k, top-p and min-p, with noise keyed
    by ``(seed, step, token id)``. A ``-inf`` token is never returned unless the whole row is
    ``-inf``. Raises ``ValueError`` on mismatched parameter lengths.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    for name in ("temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps"):
        if getattr(params, name).shape != (bsz,):
            raise ValueError(f"sample: params.{name} must have shape [{bsz}], got "
                             f"{tuple(getattr(params, name).shape)}")
    greedy = torch.argmax(logits, dim=-1)
    if params.all_greedy or bsz == 0:
        return greedy
    logits = logits.to(torch.float32)
    temps = params.temperatures.to(torch.float32)
    is_greedy = temps <= 0
    scaled = logits / torch.where(is_greedy, torch.ones_like(temps), temps)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    keep = _keep_mask(probs, logits, params)
    # Gumbel noise -log(-log(u)), computed in place in float64 (u is never 0 or 1).
    gumbel = counter_uniform(params.seeds, params.steps, vocab).log_().neg_().log_().neg_()
    score = gumbel.add_(scaled).masked_fill_(~keep, float("-inf"))
    drawn = torch.argmax(score, dim=-1)
    return torch.where(is_greedy, greedy, drawn)
