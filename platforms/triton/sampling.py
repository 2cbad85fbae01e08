"""Sampling on device: torch computes each row's filter threshold, a Triton kernel draws.

Filters (each on the row's temperature-scaled distribution, then intersected, as the
torch-native implementation does): top-k, top-p (preceding mass ``< p``), min-p. Each keeps a
prefix of the descending order, so their intersection is "logit >= threshold" with the
threshold read off the sorted logits; comparing raw logits keeps the test exact. The draw is
Gumbel-max over kept tokens with counter-based noise: token ``i`` of a row gets
``u = hash(seed, step, i)`` (the torch-native implementation's 32-bit mixing), so a row's
token depends only on its own logits, parameters, seed and step. Greedy rows take the
argmax, lowest id on ties (an all-greedy batch skips the filters and the noise: a plain
argmax). Two launches: per-chunk best, then the merge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import SamplingBatch

_BLOCK = 1024
_MIN_CHUNK = 8192


@triton.jit
def _mix32(x):
    """32-bit avalanche mix of a uint32 tensor (xorshift-multiply, "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 16)
    return x


@triton.jit
def _absorb(key, word):
    """Fold both 32-bit halves of int64 ``word`` into uint32 ``key``."""
    lo = (word & 0xFFFFFFFF).to(tl.uint32)
    hi = ((word >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(key ^ _mix32(lo ^ 0x9E3779B9))
    return _mix32(key ^ _mix32(hi ^ 0x9E3779B9))


@triton.jit
def _gumbel(key, cols):
    """Gumbel(0, 1) noise of columns ``cols`` under row key ``key`` (fp32, always finite)."""
    bits = _mix32(key ^ _mix32(cols.to(tl.uint32) ^ 0x85EBCA6B))
    u = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))


@triton.jit
def _draw_kernel(
    logits_ptr, temps_ptr, thr_ptr, seeds_ptr, steps_ptr, best_val_ptr, best_idx_ptr,
    stride_l, vocab, chunk, num_chunks,
    BLOCK: tl.constexpr, ALL_GREEDY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if ALL_GREEDY:  # plain argmax: no parameters are read
        inv_t = 1.0
        noise_w = 0.0
        thr = float("-inf")
    else:
        temp = tl.load(temps_ptr + row)
        greedy = temp <= 0
        inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temp))
        noise_w = tl.where(greedy, 0.0, 1.0)
        thr = tl.load(thr_ptr + row)
    key = tl.zeros([1], dtype=tl.uint32)
    if not ALL_GREEDY:
        key = _absorb(key, tl.load(seeds_ptr + row).to(tl.int64))
        key = _absorb(key, tl.load(steps_ptr + row).to(tl.int64))
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    best_val = tl.full([1], float("-inf"), tl.float32)
    best_idx = tl.full([1], 0, tl.int32) + vocab
    for off in range(lo, hi, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < hi
        x = tl.load(logits_ptr + row * stride_l + cols, mask=m, other=float("-inf"))
        ok = m & (x >= thr) & (x > float("-inf"))
        if ALL_GREEDY:
            val = x
        else:
            val = x * inv_t + noise_w * _gumbel(key, cols)
        val = tl.where(ok, val, float("-inf"))
        blk_max = tl.max(val, 0)
        blk_idx = tl.min(tl.where(val == blk_max, cols, vocab), 0)
        better = blk_max > best_val
        best_idx = tl.where(better, blk_idx, best_idx)
        best_val = tl.where(better, blk_max, best_val)
    one = tl.arange(0, 1)
    tl.store(best_val_ptr + row * num_chunks + c + one, best_val)
    tl.store(best_idx_ptr + row * num_chunks + c + one, best_idx)


@triton.jit
def _merge_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, vocab, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    m = offs < num_chunks
    vals = tl.load(best_val_ptr + row * num_chunks + offs, mask=m, other=float("-inf"))
    idxs = tl.load(best_idx_ptr + row * num_chunks + offs, mask=m, other=vocab)
    top = tl.max(vals, 0)
    idx = tl.min(tl.where(m & (vals == top), idxs, vocab), 0)
    idx = tl.where(top > float("-inf"), idx, 0)
    tl.store(out_ptr + row, idx.to(tl.int64))


def _thresholds(logits: torch.Tensor, params: SamplingBatch, greedy: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B]``: the smallest logit a row may draw (``-inf`` for greedy rows).

    Each filter keeps a prefix of the descending order, so each is a threshold on the sorted
    logits and their intersection is the largest of the three: top-k the ``k``-th largest
    logit; top-p the logit ending the shortest prefix whose mass reaches ``p`` (the tokens
    whose preceding mass is ``< p``); min-p ``max + T * log(min_p)`` (``p >= min_p * p_max``
    in logit space). One sort, one softmax, one cumsum and a few ``[B]``-sized ops."""
    bsz, vocab = logits.shape
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    temps = torch.where(greedy, torch.ones_like(params.temperatures),
                        params.temperatures).to(torch.float32)
    neg_inf = torch.full((bsz,), float("-inf"), device=logits.device)
    top_k = params.top_ks.to(torch.int64)
    k_idx = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab) - 1
    thr = sorted_logits.gather(1, k_idx[:, None]).squeeze(1)
    top_p = params.top_ps.to(torch.float32)
    cum = torch.cumsum(torch.softmax(sorted_logits / temps[:, None], dim=-1), dim=-1)
    # tokens whose preceding mass is < p: token 0 and every i >= 1 with cum[i - 1] < p
    n_p = 1 + torch.searchsorted(cum[:, :-1].contiguous(), top_p[:, None]).squeeze(1)
    thr_p = sorted_logits.gather(1, (n_p.clamp(max=vocab) - 1)[:, None]).squeeze(1)
    thr = torch.maximum(thr, torch.where(top_p < 1.0, thr_p, neg_inf))
    min_p = params.min_ps.to(torch.float32)
    thr_min = sorted_logits[:, 0] + temps * torch.log(min_p.clamp(min=0.0))
    thr = torch.maximum(thr, torch.where(min_p > 0, thr_min, neg_inf))
    return torch.where(greedy, neg_inf, thr).contiguous()


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Draw one token per row of ``logits`` fp32 ``[B, V]``; returns int64 ``[B]``.

    Greedy rows (temperature 0) return the argmax, lowest id on ties. Other rows draw from
    the temperature-scaled distribution restricted by top-k / top-p / min-p with noise keyed
    by ``(seed, step, token id)``. A ``-inf`` token is never returned unless the whole row is
    ``-inf`` (then 0). Does not modify ``logits``. Raises ``ValueError`` on mismatched
    parameter shapes."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    for name in ("temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps"):
        if getattr(params, name).shape != (bsz,):
            raise ValueError(f"sample: params.{name} must have shape [{bsz}], got "
                             f"{tuple(getattr(params, name).shape)}")
    if bsz == 0 or vocab == 0:
        return torch.zeros(bsz, dtype=torch.int64, device=logits.device)
    logits = logits.to(torch.float32)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    temps = params.temperatures.to(torch.float32).contiguous()
    if params.all_greedy:  # a plain argmax in the same two launches; thr is not read
        thr = temps
    else:
        thr = _thresholds(logits, params, temps <= 0)
    chunks = max(1, min(triton.cdiv(vocab, _MIN_CHUNK), triton.cdiv(264, bsz)))
    block = max(16, min(_BLOCK, triton.next_power_of_2(vocab)))
    chunk = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
    chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty((bsz, chunks), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((bsz, chunks), dtype=torch.int32, device=logits.device)
    _draw_kernel[(bsz, chunks)](
        logits, temps, thr, params.seeds.contiguous(), params.steps.contiguous(),
        best_val, best_idx, logits.stride(0), vocab, chunk, chunks, BLOCK=block,
        ALL_GREEDY=params.all_greedy, num_warps=4)
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    _merge_kernel[(bsz,)](best_val, best_idx, out, chunks, vocab,
                          BLOCK_C=max(2, triton.next_power_of_2(chunks)), num_warps=1)
    return out
