"""Tool calls of a streaming output, as OpenAI stream deltas.

:class:`ToolCallStream` re-scans the output so far on every delta (as the reasoning parser
does) and sends only what is new: content text, then per call a first delta with ``index``,
``id``, ``type`` and ``function.name`` (arguments ``""``), then ``function.arguments``
fragments. This is the shape the OpenAI client accumulates. A call is announced once its
name is complete; calls after a malformed one are not announced.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from heteroserve.server.protocol import DeltaFunctionCall, DeltaToolCall
from heteroserve.server.tool_calls.base import Scan, ToolCallParser

logger = logging.getLogger(__name__)


def new_call_id() -> str:
    """A fresh tool-call id, ``call_`` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class StreamDelta:
    """What one step adds: content text (``""`` when none) and tool-call deltas."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass
class _Sent:
    id: str
    arguments: int = 0  # characters of arguments sent


class ToolCallStream:
    """One streaming choice's tool-call state (see the module docstring); calls after the
    first ``max_calls`` are not sent."""

    def __init__(self, parser: ToolCallParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self._content = 0
        self._calls: list[_Sent] = []

    @property
    def called(self) -> bool:
        """True once a tool call has been announced."""
        return bool(self._calls)

    def push(self, text: str, final: bool = False) -> StreamDelta:
        """Add output text; return what became certain (``final``: the output ended, so
        everything not sent yet)."""
        self.text += text
        return self._diff(self.parser.scan(self.text, final=final))

    def _diff(self, scan: Scan) -> StreamDelta:
        out = StreamDelta()
        if len(scan.content) > self._content:
            out.content = scan.content[self._content:]
            self._content = len(scan.content)
        for index, draft in enumerate(scan.calls[:self.max_calls]):
            if draft.name is None:
                break
            if index == len(self._calls):
                self._calls.append(_Sent(new_call_id()))
                out.tool_calls.append(DeltaToolCall(
                    index=index, id=self._calls[index].id, type="function",
                    function=DeltaFunctionCall(name=draft.name, arguments="")))
            sent = self._calls[index]
            if len(draft.arguments) > sent.arguments:
                piece = draft.arguments[sent.arguments:]
                sent.arguments = len(draft.arguments)
                if out.tool_calls and out.tool_calls[-1].index == index:
                    out.tool_calls[-1].function.arguments += piece  # type: ignore[union-attr]
                else:
                    out.tool_calls.append(DeltaToolCall(
                        index=index, function=DeltaFunctionCall(arguments=piece)))
            if draft.error:
                break
        return out
