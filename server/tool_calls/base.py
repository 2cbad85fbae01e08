"""The contract every tool-call parser implements, and the pieces the formats share.

A parser reads a model's output text and tells apart plain ``content`` from tool calls.
It has one method, :meth:`ToolCallParser.scan`, used both for the whole text of a finished
output and for the text so far of a streaming one; :class:`~.stream.ToolCallStream` turns
successive scans into OpenAI stream deltas. The scan of a longer text must extend the scan of
a shorter one (content and each call's arguments only grow), which is what lets streamed
deltas add up to the same reply as a non-streaming request.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import ClassVar

from heteroserve.server.tool_calls.jsonscan import scan_object, skip_ws

#: keys that carry a call's arguments (Llama 3 and the forced-array format use "parameters")
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class CallDraft:
    """One tool call as far as the text shows it. ``name``: None until the whole name is
    known; ``arguments``: the arguments' JSON text so far (a prefix of the final text);
    ``complete``: the call's text has ended; ``error``: its text cannot be a call."""

    name: str | None = None
    arguments: str = ""
    complete: bool = False
    error: bool = False


@dataclass
class Scan:
    """A parse of output text: ``content`` (the text that is not a tool call; while streaming,
    text that may still turn out to start a call is held back) and the calls in order."""

    content: str = ""
    calls: list[CallDraft] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedCall:
    """A finished tool call: the function ``name`` and its ``arguments`` as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    """A finished output: ``content`` (None when empty) and its tool calls (empty when the
    model called none or its calls were malformed; then all the text is content)."""

    content: str | None
    calls: tuple[ParsedCall, ...] = ()


class ToolCallParser(ABC):
    """Splits one output's text into content and tool calls (see the module docstring).

    ``name``: the ``--tool-call-parser`` value. ``needs_special_tokens``: the format's
    markers are special tokens in its models' tokenizers, so the output must be detokenized
    with ``skip_special_tokens: false`` (the server sets that unless the request chose).
    Parsers hold no state: one instance serves every request.
    """

    name: ClassVar[str]
    needs_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def scan(self, text: str, final: bool) -> Scan:
        """Parse ``text``. ``final``: the output has ended (nothing is held back).
        Never raises: text that is not a well-formed call shows as a draft with ``error``."""

    def parse(self, text: str) -> ParsedOutput:
        """The finished output ``text`` as content and calls. When any call is incomplete
        or its arguments are not a JSON object, no call is returned and all of ``text`` is
        content (as vLLM does)."""
        scan = self.scan(text, final=True)
        calls = []
        for draft in scan.calls:
            if draft.error or not draft.complete or not draft.name or \
                    not _is_json_object(draft.arguments):
                return ParsedOutput(text or None)
            calls.append(ParsedCall(draft.name, draft.arguments))
        return ParsedOutput(scan.content or None, tuple(calls))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def call_from_object(text: str, start: int) -> tuple[CallDraft, int | None]:
    """The call written as a JSON object ``{"name": ..., "arguments": {...}}`` at
    ``text[start]`` (``parameters`` may stand for ``arguments``; arguments given as a JSON
    string are unwrapped), and the index just past the object (None while it is open)."""
    obj = scan_object(text, start)
    draft = CallDraft(complete=obj.end is not None, error=obj.error)
    name = obj.member("name")
    if name is not None and name.value_end is not None:
        try:
            value = json.loads(name.raw(text))
        except ValueError:
            value = None
        if isinstance(value, str) and value:
            draft.name = value
        else:
            draft.error = True
    args = obj.member(*ARGUMENT_KEYS)
    if args is not None:
        raw = args.raw(text)
        if raw.startswith('"'):  # arguments as a JSON string: usable once complete
            draft.arguments = _unwrap(raw) if args.value_end is not None else ""
        else:
            draft.arguments = raw
    elif draft.complete:
        draft.arguments = "{}"
    if draft.complete and draft.name is None:
        draft.error = True
    return draft, obj.end


def _unwrap(raw: str) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, str) else raw


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def open_text(text: str, markers: tuple[str, ...], final: bool) -> str:
    """Content text that a call marker may still follow: while streaming, a tail that could
    begin one of ``markers`` and trailing whitespace (dropped before a call) are held back."""
    if final:
        return text
    cut = max((held_back(text, m) for m in markers), default=0)
    return text[:len(text) - cut].rstrip()


def join_content(parts: list[str]) -> str:
    """Content pieces from around calls (whitespace next to a call already dropped), joined
    by newlines."""
    return "\n".join(p for p in parts if p)


def scan_blocks(text: str, start: str, end: str, body: Callable[[str, bool], list[CallDraft]],
                final: bool) -> Scan:
    """Scan a format whose calls sit between ``start`` and ``end`` markers; ``body(text,
    final)`` reads the calls of one block's inner text (``final``: the block is closed or the
    output ended). Text outside blocks is content."""
    parts: list[str] = []
    calls: list[CallDraft] = []
    pos = 0
    while True:
        s = text.find(start, pos)
        if s < 0:
            tail = text[pos:].lstrip() if pos else text[pos:]
            parts.append(open_text(tail, (start,), final))
            break
        head = text[pos:s]
        parts.append((head.lstrip() if pos else head).rstrip())
        inner = s + len(start)
        e = text.find(end, inner)
        if e < 0:
            calls += body(text[inner:], final)
            break
        calls += body(text[inner:e], True)
        pos = e + len(end)
    return Scan(join_content(parts), calls)


def call_array(text: str, start: int) -> tuple[list[CallDraft], int | None, bool]:
    """The calls of a JSON array of call objects ``[{...}, {...}]`` whose ``[`` is at
    ``text[start]``: ``(calls, index past the ]`` or None while open, ``error)``."""
    calls: list[CallDraft] = []
    i = skip_ws(text, start + 1)
    while i < len(text):
        if text[i] == "]" and not calls:
            return calls, i + 1, False
        if text[i] != "{":
            return calls, None, True
        draft, end = call_from_object(text, i)
        calls.append(draft)
        if end is None or draft.error:
            return calls, None, draft.error
        i = skip_ws(text, end)
        if i >= len(text):
            break
        if text[i] == "]":
            return calls, i + 1, False
        if text[i] != ",":
            return calls, None, True
        i = skip_ws(text, i + 1)
    return calls, None, False
