"""Turn a :class:`GenerateRequest` into what the scheduler needs, rejecting bad input early.

Everything here runs in the caller's thread before anything is sent; every failure is a
:class:`RequestError` with one line.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from heteroserve.core.runtime.errors import RequestError, one_line
from heteroserve.core.runtime.io_struct import GenerateRequest, ReadyInfo
from heteroserve.core.tokenizer import Tokenizer

MAX_N = 128
MAX_TOP_LOGPROBS = 20


@dataclass
class PreparedRequest:
    """A validated request: token ids, a validated ``SamplingParams`` (without ``n``), and the
    frontend-side options (stop strings, special-token skipping, streaming, logprobs)."""

    rid: str
    input_ids: list[int]
    sampling_params: Any
    n: int
    stop: list[str]
    skip_special_tokens: bool
    no_stop_trim: bool
    stream: bool
    return_logprob: bool
    top_logprobs_num: int
    logprob_start_len: int


def _grammar(params: dict[str, Any], compile_grammar: Callable[[Any], str] | None
             ) -> tuple[str, bool] | None:
    """``(serialised grammar, is_json)`` for a constrained request, else None."""
    from heteroserve.core.grammar.spec import GrammarError, spec_from_sampling_params

    try:
        spec = spec_from_sampling_params(params)
        if spec is None:
            return None
        if compile_grammar is None:
            raise RequestError("this engine has no structured-output support")
        return compile_grammar(spec), spec.kind in ("json_schema", "json_object")
    except GrammarError as exc:
        raise RequestError(one_line(exc)) from None


def _sampling_params(params: dict[str, Any]) -> Any:
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    try:
        sp = SamplingParams(**params)
    except TypeError as exc:
        raise RequestError(f"invalid sampling params: {one_line(exc)}") from None
    try:
        sp.validate()
    except (ValueError, TypeError) as exc:
        raise RequestError(f"invalid sampling params: {one_line(exc)}") from None
    return sp


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise RequestError("invalid sampling params: stop must be a string or a list of strings")


def _input_ids(req: GenerateRequest, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    if (req.text is None) == (req.input_ids is None):
        raise RequestError("give exactly one of text or input_ids")
    if req.text is not None:
        if not isinstance(req.text, str):
            raise RequestError(f"text must be a string, got {type(req.text).__name__}")
        ids = tokenizer.encode(req.text)
    else:
        if not isinstance(req.input_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in req.input_ids):
            raise RequestError("input_ids must be a list of integers")
        ids = list(req.input_ids)
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise RequestError(f"input_ids contains token id {bad[0]} outside the vocabulary "
                               f"[0, {vocab_size})")
    if not ids:
        raise RequestError("the prompt is empty")
    return ids


def prepare_request(req: GenerateRequest, tokenizer: Tokenizer, info: ReadyInfo,
                    compile_grammar: Callable[[Any], str] | None = None) -> PreparedRequest:
    """Validate and tokenize ``req``. Raises :class:`RequestError` (one line) on bad input:
    neither or both of text/input_ids, empty prompt, token ids outside the vocabulary, prompt
    plus ``max_new_tokens`` beyond the context window, invalid sampling parameters, ``n`` not in
    [1, 128], ``top_logprobs_num`` not in [0, 20], an invalid or too slow grammar.

    ``compile_grammar(spec) -> serialised grammar`` compiles ``json_schema`` / ``regex`` /
    ``ebnf`` / ``choice`` / ``json_object`` constraints (raising ``GrammarError``); the result
    is attached as ``sampling_params.grammar``."""
    if req.sampling_params is not None and not isinstance(req.sampling_params, dict):
        raise RequestError("sampling_params must be a dict")
    params = dict(req.sampling_params or {})
    n = params.pop("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise RequestError(
            f"invalid sampling params: n must be an integer in [1, {MAX_N}], got {n!r}")
    stop = _stop_list(params.get("stop"))
    sp = _sampling_params(params)
    grammar = _grammar(params, compile_grammar)
    if grammar is not None:
        sp.grammar, sp.grammar_json_output = grammar
    top_n = req.top_logprobs_num or 0
    if not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {top_n!r}")
    vocab = max(tokenizer.vocab_size, int(info.extra.get("vocab_size") or 0))
    ids = _input_ids(req, tokenizer, vocab)
    context = info.max_context_len
    if len(ids) >= context:
        raise RequestError(f"the prompt has {len(ids)} tokens but the context window is "
                           f"{context}; shorten it")
    max_new = getattr(sp, "max_new_tokens", None)
    if max_new is not None and len(ids) + max_new > context:
        raise RequestError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new}) "
                           f"exceeds the context window of {context} tokens")
    rid = req.rid if req.rid is not None else uuid.uuid4().hex
    if not isinstance(rid, str) or not rid:
        raise RequestError("rid must be a non-empty string")
    start = req.logprob_start_len if req.logprob_start_len is not None else -1
    return PreparedRequest(
        rid=rid, input_ids=ids, sampling_params=sp, n=n, stop=stop,
        skip_special_tokens=bool(sp.skip_special_tokens), no_stop_trim=bool(sp.no_stop_trim),
        stream=bool(req.stream), return_logprob=bool(req.return_logprob) or top_n > 0,
        top_logprobs_num=top_n, logprob_start_len=int(start))
