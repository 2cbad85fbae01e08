"""Errors raised by the engine runtime to its callers (the HTTP server and the offline Engine)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request is invalid (bad sampling parameters, empty or too long prompt...).

    Raised before anything reaches the scheduler; the message is one line fit for a 400 reply
    and ``param`` names the offending field where one is to blame.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """``--max-queued-requests`` requests are already waiting, or too many grammars are
    compiling; retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The scheduler process died or failed; every pending and later request fails with it."""


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """``exc``'s message as a single line (its lines joined with ``" "``, at most ``limit``
    characters), else its type name."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text or type(exc).__name__
