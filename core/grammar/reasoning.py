"""Reasoning models: keep the grammar off until the reasoning section closes, and return
the reasoning text separately (``reasoning_content``).

``deepseek-r1``: the chat template opens ``<think>`` in the prompt, so every output starts
inside reasoning until ``</think>``. ``qwen3``: the model opens ``<think>`` itself; text
before ``</think>`` is reasoning when the output starts with ``<think>``. For both, a
constrained request's grammar applies only to tokens after the ``</think>`` token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARSERS = ("deepseek-r1", "qwen3")
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    """``kind`` in :data:`PARSERS`; ``think_end_id`` is the token id of ``</think>``."""

    kind: str
    think_end_id: int

    @classmethod
    def create(cls, kind: str, tokenizer: Any) -> ReasoningParser:
        """Raise ``ValueError`` for an unknown kind or a tokenizer without ``</think>``."""
        if kind not in PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {kind!r}")
        end = tokenizer.convert_tokens_to_ids(THINK_END)
        if end is None or end == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {THINK_END} token; {kind} parsing needs it")
        return cls(kind, int(end))

    def reasoning_closed(self, output_ids: list[int]) -> bool:
        """True once ``</think>`` has been generated: the grammar applies from then on."""
        return self.think_end_id in output_ids

    def split(self, text: str) -> tuple[str | None, str]:
        """``(reasoning_content, content)`` of an output so far (``None``: no reasoning)."""
        body = text
        if self.kind == "qwen3":
            if not text.lstrip().startswith(THINK_START):
                return None, text
        if body.lstrip().startswith(THINK_START):
            body = body.lstrip()[len(THINK_START):]
        reasoning, sep, content = body.partition(THINK_END)
        if not sep:
            return reasoning.strip("\n") or None, ""
        return reasoning.strip("\n"), content.lstrip("\n")
