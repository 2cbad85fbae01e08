"""What a request asks to be constrained to, in one normalised form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json_schema", "json_object", "regex", "ebnf", "choice")


class GrammarError(ValueError):
    """An invalid schema, regex, grammar or choice list, or one that compiles too slowly.
    The message is xgrammar's own where it has one."""


@dataclass(frozen=True)
class GrammarSpec:
    """``kind`` in :data:`KINDS`; ``text`` is the schema JSON, regex, EBNF, or a JSON list of
    choices. Hashable: it keys the compile cache together with the tokenizer."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {KINDS}")


def _ebnf_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def choice_to_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choice needs a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(_ebnf_string(c) for c in choices)


def spec_from_sampling_params(params: dict[str, Any]) -> GrammarSpec | None:
    """Read SGLang's sampling-parameter names (``json_schema``, ``regex``, ``ebnf``) plus
    ``choice`` (a list of strings) and ``json_object`` (bool). At most one may be set."""
    given = {k: params.get(k) for k in ("json_schema", "regex", "ebnf", "choice", "json_object")
             if params.get(k) not in (None, False)}
    if not given:
        return None
    if len(given) > 1:
        raise GrammarError(f"only one constraint may be set, got {', '.join(sorted(given))}")
    kind, value = next(iter(given.items()))
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "choice":
        if not isinstance(value, list):
            raise GrammarError("choice must be a list of strings")
        return GrammarSpec("choice", json.dumps(value))
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if not isinstance(value, str):
        raise GrammarError(f"{kind} must be a string")
    return GrammarSpec(kind, value)
