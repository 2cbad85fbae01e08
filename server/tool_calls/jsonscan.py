"""A scanner for JSON objects that may still be arriving (a model's output so far).

:func:`scan_object` finds the top-level members of the object that starts at ``text[start]``
and where each value's text begins and, once it is complete, ends. It never decodes values,
so a parser can stream a member's raw text (a tool call's ``arguments``) while it grows: the
text of an open value is always a prefix of its final text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"


@dataclass
class JsonMember:
    """One top-level member: ``key``, and its value's span ``[value_start, value_end)``
    (``value_end`` is None while the value is still open)."""

    key: str
    value_start: int
    value_end: int | None = None

    def raw(self, text: str) -> str:
        """The value's text so far (trailing whitespace of an open scalar dropped)."""
        if self.value_end is not None:
            return text[self.value_start:self.value_end]
        raw = text[self.value_start:]
        return raw if raw[:1] in ('"', "{", "[") else raw.rstrip(_WS)


@dataclass
class JsonObjectScan:
    """What :func:`scan_object` found. ``end``: the index just past the closing brace (None
    while the object is open); ``error``: the text is not the start of a JSON object."""

    members: list[JsonMember] = field(default_factory=list)
    end: int | None = None
    error: bool = False

    def member(self, *keys: str) -> JsonMember | None:
        """The first member named one of ``keys``."""
        return next((m for m in self.members if m.key in keys), None)


def scan_object(text: str, start: int) -> JsonObjectScan:
    """Scan the JSON object whose ``{`` is at ``text[start]`` (leading whitespace allowed).

    Structure only: a member key must be a valid JSON string and separators must be in
    place, but scalar values are not checked (``json.loads`` on the complete text does that).
    """
    out = JsonObjectScan()
    depth, in_str, esc = 0, False, False
    expect = "open"  # at depth 1: key | key_str | colon | value | value_str | scalar | nested | comma
    key_start = last = 0
    key = ""
    cur: JsonMember | None = None
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if expect == "key_str":
                    try:
                        key = json.loads(text[key_start:i + 1])
                    except ValueError:
                        out.error = True
                        return out
                    expect = "colon"
                elif expect == "value_str":
                    cur.value_end = i + 1  # type: ignore[union-attr]
                    expect = "comma"
            continue
        if c in _WS:
            continue
        if expect == "open":
            if c != "{":
                out.error = True
                return out
            depth, expect = 1, "key"
        elif expect == "nested":
            if c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 1:
                    cur.value_end, expect = i + 1, "comma"  # type: ignore[union-attr]
        elif expect == "key":
            if c == '"':
                in_str, key_start, expect = True, i, "key_str"
            elif c == "}" and not out.members:
                out.end = i + 1
                return out
            else:
                out.error = True
                return out
        elif expect == "colon":
            if c != ":":
                out.error = True
                return out
            expect = "value"
        elif expect == "value":
            cur = JsonMember(key, i)
            out.members.append(cur)
            if c == '"':
                in_str, expect = True, "value_str"
            elif c in "{[":
                depth, expect = 2, "nested"
            elif c in ",}]:":
                out.error = True
                return out
            else:
                expect = "scalar"
        elif expect == "scalar" and c in ",}":
            cur.value_end = last + 1  # type: ignore[union-attr]
            expect = "key" if c == "," else "closed"
        elif expect == "comma":
            if c not in ",}":
                out.error = True
                return out
            expect = "key" if c == "," else "closed"
        if expect == "closed":
            out.end = i + 1
            return out
        last = i
    return out


def skip_ws(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    while i < len(text) and text[i] in _WS:
        i += 1
    return i
