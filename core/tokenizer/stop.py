"""Stop strings over streamed text: cut before the first match, never leak a prefix of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters a text stream against ``stops``.

    Feed text pieces with :meth:`feed`; it returns the text that is safe to release. Text that
    could still become the start of a stop string is held back until it either completes a
    stop string (then everything from the match on is dropped and :attr:`matched` is set) or
    can no longer match (then it is released). :meth:`flush` releases what is held at the end
    of a stream that finished for another reason.

    Invariant (every piece fed with ``check``): the concatenation of everything returned never
    contains any stop string, and equals the full text cut before the stop-string occurrence
    that ends first (ties: the longest), however the text was split into pieces.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, text: str, check: bool = True) -> str:
        """Add ``text`` and return the part that can be released now ("" after a match).
        ``check`` False (a request's ``min_new_tokens`` not reached): release what is held
        and ``text`` unmatched; matching resumes with the next text fed with ``check``."""
        if self.matched is not None:
            return ""
        if not check:
            out, self._held = self._held + text, ""
            return out
        if not self.stops:
            return text
        buf = self._held + text
        # the stop string that completes first wins (ties: the longest), so the result does
        # not depend on how the text was split into pieces
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0:
                key = (i + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is not None:
            self.matched = best[2]
            self._held = ""
            return buf[:best[0] + best[1]]
        keep = self._longest_pending_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """Release held text (the stream ended without completing a stop string)."""
        out, self._held = ("" if self.matched is not None else self._held), ""
        return out

    def _longest_pending_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
