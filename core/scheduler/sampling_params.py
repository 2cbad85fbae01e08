"""Per-request sampling parameters, with SGLang's names, and their one validation.

Every entry point (the OpenAI routes, native ``/generate``, the offline ``Engine``) ends in a
:class:`SamplingParams` that :meth:`SamplingParams.validate` checked once, at admission, before
anything reaches the scheduler: after it the scheduler can trust every value (ranges, finite
floats, 64-bit seeds, token ids inside the vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100.0


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``param`` names it (SGLang's name)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """Built with :meth:`from_dict` (SGLang's ``sampling_params`` dict; unknown names are an
    error) or directly with keyword arguments; :meth:`validate` raises
    :class:`SamplingParamsError` (one line, naming the parameter) for anything out of range.

    ``stop`` strings are enforced by the frontend on text. ``min_new_tokens`` (vLLM's
    ``min_tokens``): until the output holds that many tokens, EOS (unless ``ignore_eos``) and
    ``stop_token_ids`` cannot be sampled and stop strings are not matched; it cannot exceed
    ``max_new_tokens`` nor combine with an output constraint (the grammar may allow nothing
    but the end). ``allowed_token_ids`` (vLLM's): only these ids may be sampled (EOS and stop
    tokens too only if listed); not with an output constraint either. ``json_schema`` / ``regex`` /
    ``ebnf`` / ``choice`` / ``json_object`` state an output constraint; the frontend compiles
    it and sets ``grammar`` (xgrammar's serialised grammar; ``grammar_json_output`` marks JSON
    grammars). ``logit_bias`` maps token id -> bias in [-100, 100] after validation (keys may
    arrive as strings, as in OpenAI's API).
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    json_schema: Any = None
    regex: str | None = None
    ebnf: str | None = None
    choice: list[str] | None = None
    json_object: bool = False
    grammar: str | None = None
    grammar_json_output: bool = False
    logit_bias: dict[Any, float] | None = None
    allowed_token_ids: list[int] | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SamplingParams:
        """From SGLang's dict form. Raises :class:`SamplingParamsError` for an unknown name
        (``n`` is the caller's business and must be removed first)."""
        known = {f.name for f in fields(cls)} - {"grammar", "grammar_json_output"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SamplingParamsError(unknown[0], f"unknown sampling parameter {unknown[0]!r}")
        return cls(**params)

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` as a list (validated: non-empty strings)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self, vocab_size: int) -> None:
        """Check every field (types, ranges, finiteness, ids in ``[0, vocab_size)``) and
        normalise ``logit_bias`` keys to ints. Raises :class:`SamplingParamsError`."""
        _int("max_new_tokens", self.max_new_tokens, 0, INT64_MAX)
        self._validate_min_new_tokens()
        _float("temperature", self.temperature, 0.0, math.inf)
        _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if _int("top_k", self.top_k, -1, INT64_MAX) == 0:
            raise SamplingParamsError("top_k", "top_k must be -1 (off) or a positive integer, got 0")
        _float("min_p", self.min_p, 0.0, 1.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("repetition_penalty", self.repetition_penalty, 0.0, 2.0, low_open=True)
        if self.seed is not None:
            _int("seed", self.seed, INT64_MIN, INT64_MAX)
        for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim", "json_object"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"{name} must be true or false")
        self._validate_stop()
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, list) or len(ids) > MAX_STOP_TOKEN_IDS:
                raise SamplingParamsError("stop_token_ids", "stop_token_ids must be a list of at "
                                          f"most {MAX_STOP_TOKEN_IDS} token ids")
            for t in ids:
                _int("stop_token_ids", t, 0, vocab_size - 1)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias, vocab_size)
        self._validate_allowed_token_ids(vocab_size)

    def _validate_min_new_tokens(self) -> None:
        if _int("min_new_tokens", self.min_new_tokens, 0, INT64_MAX) == 0:
            return
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError("min_new_tokens", f"min_new_tokens ({self.min_new_tokens}) "
                                      f"must not exceed max_new_tokens ({self.max_new_tokens})")
        self._refuse_with_a_constraint("min_new_tokens")

    def _refuse_with_a_constraint(self, param: str) -> None:
        """Raise when an output constraint is set: ``param`` masks the logits in ways the
        grammar may not allow for (it may leave no token at all)."""
        constraint = next((name for name in ("json_schema", "regex", "ebnf", "choice",
                                             "json_object", "grammar")
                           if getattr(self, name) not in (None, False)), None)
        if constraint is not None:
            raise SamplingParamsError(param, f"{param} cannot be combined with an output "
                                      f"constraint ({constraint})")

    def _validate_allowed_token_ids(self, vocab_size: int) -> None:
        ids = self.allowed_token_ids
        if ids is None:
            return
        if not isinstance(ids, list) or not ids or len(ids) > vocab_size:
            raise SamplingParamsError("allowed_token_ids", "allowed_token_ids must be a "
                                      f"non-empty list of at most {vocab_size} token ids")
        for t in ids:
            _int("allowed_token_ids", t, 0, vocab_size - 1)
        self._refuse_with_a_constraint("allowed_token_ids")

    def holds_back_stops(self, output_len: int) -> bool:
        """Whether, with ``output_len`` tokens generated, the next token may not end the
        request (``min_new_tokens`` not reached yet)."""
        return output_len < self.min_new_tokens

    def processes_logits(self, output_len: int) -> bool:
        """Whether the next token's logits (``output_len`` tokens generated) need this
        request's own processing before sampling: logit bias, penalties, allowed ids or held
        back stops (``batch_sampling.apply_penalties``)."""
        return (bool(self.logit_bias) or self.needs_penalties
                or self.allowed_token_ids is not None or self.holds_back_stops(output_len))

    def _validate_stop(self) -> None:
        stop = self.stop
        if stop is None:
            return
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise SamplingParamsError("stop", "stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in stops:
            if not s:
                raise SamplingParamsError("stop", "stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise SamplingParamsError(
                    "stop", f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (self.frequency_penalty != 0 or self.presence_penalty != 0
                or self.repetition_penalty != 1.0)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SamplingParamsError(name, f"{name} must be in [{low}, {high}], got {value}")
    return value


def _float(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value}")
    if v < low or v > high or (low_open and v == low):
        bracket = "(" if low_open else "["
        raise SamplingParamsError(name, f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return v


def _logit_bias(bias: Any, vocab_size: int) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise SamplingParamsError("logit_bias", "logit_bias must map token ids to numbers")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise SamplingParamsError("logit_bias",
                                  f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, bool):
            token = None
        elif isinstance(key, int):
            token = key
        else:
            text = str(key).strip()
            token = int(text) if text.isascii() and text.isdigit() else None
        if token is None or not 0 <= token < vocab_size:
            raise SamplingParamsError("logit_bias", f"logit_bias key {key!r} is not a token id "
                                      f"in [0, {vocab_size})")
        out[token] = _float("logit_bias", value, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
    return out
