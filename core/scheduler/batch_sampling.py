"""From a step's logits to its next tokens: logit bias, penalties, grammar masks, sampling
and logprobs, as batched torch ops on the logits' device."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch

from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.core.scheduler.request import Req


class SamplingRunner(Protocol):
    """What sampling needs from the model runner: its platform's sampling op."""

    def sample(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor: ...


def apply_penalties(logits: torch.Tensor, reqs: list[Req], eos: Collection[int] = ()
                    ) -> dict[int, str]:
    """In place, rows with penalties, logit bias, ``allowed_token_ids`` or a ``min_new_tokens``
    not reached only.
    Logit bias: add each (validated) token id's bias. Repetition penalty (Hugging Face
    semantics, over prompt and output): positive logits divided by it, negative multiplied.
    Frequency/presence penalties (OpenAI semantics, over the output): subtract ``frequency *
    count + presence * (count > 0)``. ``allowed_token_ids``: every other id goes to ``-inf``.
    Below ``min_new_tokens`` output tokens: the request's ``stop_token_ids`` and, unless it
    ignores EOS, the ``eos`` ids go to ``-inf``.

    Returns ``{row: message}`` for rows whose request could not be processed; those rows
    are left as they were and the caller fails those requests alone."""
    failed: dict[int, str] = {}
    for row, req in enumerate(reqs):
        sp = req.sampling_params
        if not sp.processes_logits(len(req.output_ids)):
            continue
        try:
            _penalise_row(logits, row, req)
            if sp.allowed_token_ids is not None:
                _allow_only(logits, row, sp.allowed_token_ids)
            if sp.holds_back_stops(len(req.output_ids)):
                _forbid_stops(logits, row, req, eos)
        except Exception as exc:  # one request's parameters must not stop the batch
            failed[row] = f"cannot apply sampling penalties: {type(exc).__name__}: {exc}"
    return failed


def _allow_only(logits: torch.Tensor, row: int, allowed: list[int]) -> None:
    ids = torch.tensor(allowed, dtype=torch.int64, device=logits.device)
    kept = logits[row, ids]
    logits[row] = float("-inf")
    logits[row, ids] = kept


def _forbid_stops(logits: torch.Tensor, row: int, req: Req, eos: Collection[int]) -> None:
    sp = req.sampling_params
    stops = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else set(eos))
    stops = {t for t in stops if 0 <= t < logits.shape[1]}
    if stops:
        ids = torch.tensor(sorted(stops), dtype=torch.int64, device=logits.device)
        logits[row, ids] = float("-inf")


def _penalise_row(logits: torch.Tensor, row: int, req: Req) -> None:
    sp = req.sampling_params
    vocab = logits.shape[1]
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), dtype=torch.int64, device=logits.device)
        vals = torch.tensor(list(sp.logit_bias.values()), dtype=logits.dtype,
                            device=logits.device)
        logits[row].index_add_(0, ids, vals)
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.fill_ids)), device=logits.device)
        vals = logits[row, seen]
        logits[row, seen] = torch.where(vals > 0, vals / sp.repetition_penalty,
                                        vals * sp.repetition_penalty)
    if req.output_ids and (sp.frequency_penalty or sp.presence_penalty):
        counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
        out = torch.tensor(req.output_ids, device=logits.device)
        counts.index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits[row] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)


def sampling_batch(reqs: list[Req], device: torch.device, step_offset: int = 0) -> SamplingBatch:
    sps = [r.sampling_params for r in reqs]
    return SamplingBatch(
        temperatures=torch.tensor([0.0 if s.greedy else s.temperature for s in sps],
                                  dtype=torch.float32).to(device),
        top_ks=torch.tensor([s.top_k if s.top_k > 0 else 0 for s in sps], dtype=torch.int32).to(device),
        top_ps=torch.tensor([s.top_p for s in sps], dtype=torch.float32).to(device),
        min_ps=torch.tensor([s.min_p for s in sps], dtype=torch.float32).to(device),
        seeds=torch.tensor([r.seed for r in reqs], dtype=torch.int64).to(device),
        steps=torch.tensor([len(r.output_ids) + step_offset for r in reqs],
                           dtype=torch.int64).to(device),
        all_greedy=all(s.greedy for s in sps))


_GREEDY_BATCHES: dict[tuple[int, str], SamplingBatch] = {}


def greedy_batch(size: int, device: torch.device) -> SamplingBatch:
    """An all-greedy :class:`SamplingBatch` of ``size`` rows on ``device``, made once per
    (size, device) and shared (sampling ops never write their parameters), so a greedy step
    costs no host-to-device copies."""
    key = (size, str(device))
    batch = _GREEDY_BATCHES.get(key)
    if batch is None:
        zeros = torch.zeros(size, dtype=torch.float32, device=device)
        ints = torch.zeros(size, dtype=torch.int64, device=device)
        batch = SamplingBatch(temperatures=zeros, top_ks=ints.to(torch.int32),
                              top_ps=torch.ones(size, dtype=torch.float32, device=device),
                              min_ps=zeros, seeds=ints, steps=ints, all_greedy=True)
        _GREEDY_BATCHES[key] = batch
    return batch


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Req]
                ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Per row: the chosen token's logprob and the top-N alternatives, from ``log_softmax``
    of the logits after bias, penalties and grammar masks but before temperature (so a
    logprob describes the model's distribution, as in SGLang and vLLM)."""
    rows = [i for i, r in enumerate(reqs) if r.return_logprob]
    chosen: list[float | None] = [None] * len(reqs)
    tops: list[list[tuple[int, float]] | None] = [None] * len(reqs)
    if not rows:
        return chosen, tops
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[index].float(), dim=-1)
    picked = lp.gather(1, tokens[index].view(-1, 1)).view(-1).tolist()
    k = max(reqs[i].top_logprobs_num for i in rows)
    top_vals, top_ids = (lp.topk(k, dim=-1) if k else (None, None))
    for j, i in enumerate(rows):
        chosen[i] = picked[j]
        n = reqs[i].top_logprobs_num
        if n and top_ids is not None:
            tops[i] = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
        else:
            tops[i] = []
    return chosen, tops


def sample(runner: SamplingRunner, logits: torch.Tensor, reqs: list[Req],
           step_offset: int = 0) -> torch.Tensor:
    """Next token ids ``[B]`` (int64, on the logits' device) from the platform's sampling op.
    An all-greedy batch passes a shared :func:`greedy_batch` (the op's argmax path) instead
    of building per-row parameter tensors. ``step_offset``: tokens already sampled but not
    yet appended (overlap scheduling)."""
    if all(r.sampling_params.greedy for r in reqs):
        return runner.sample(logits, greedy_batch(logits.shape[0], logits.device))
    return runner.sample(logits, sampling_batch(reqs, logits.device, step_offset))


def token_logprobs(logits: torch.Tensor, targets: list[int], top_n: int
                   ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Row ``i``'s ``log_softmax`` at ``targets[i]`` (the prompt's next token) and its
    ``top_n`` best ``(token id, logprob)`` pairs; ``logits`` fp32 ``[len(targets), vocab]``."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.int64, device=logits.device).view(-1, 1)
    picked: list[float | None] = list(lp.gather(1, index).view(-1).tolist())
    if not top_n:
        return picked, [[] for _ in targets]
    vals, ids = lp.topk(top_n, dim=-1)
    return picked, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]


def prompt_logprobs(req: Req, logits: torch.Tensor
                    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """The prompt logprobs (and top pairs) from ``req.prompt_logprob_next`` on that
    ``logits`` (fp32 rows for positions ``req.kv_len`` onwards) determine; position 0 has none
    (``None``, no pairs). Empty when the rows reach no new prompt position."""
    first = req.prompt_logprob_next
    values: list[float | None] = []
    tops: list[list[tuple[int, float]]] = []
    if first == 0:
        values, tops, first = [None], [[]], 1
    end = min(req.kv_len + logits.shape[0], len(req.input_ids) - 1)  # last position + 1
    # the logits row at position p - 1 gives the logprob of prompt token p
    lo, hi = first - 1 - req.kv_len, end - req.kv_len
    if hi > lo:
        got, got_tops = token_logprobs(logits[lo:hi], req.input_ids[first:end + 1],
                                       req.top_logprobs_num)
        values += got
        tops += got_tops
    return values, tops
