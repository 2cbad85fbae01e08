"""Per-request incremental detokenization that only ever emits complete characters."""

from __future__ import annotations

from collections.abc import Sequence

from heteroserve.core.tokenizer.loader import Tokenizer
from heteroserve.core.tokenizer.stop import StopStringMatcher

# Prompt tokens decoded as context so that the first output token's leading space (and
# similar context-dependent decoding) comes out as it would in the full text.
CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, a few tokens at a time.

    Uses two offsets into its id window (as the established engines do): the text of
    ``ids[prefix:read]`` was already emitted; each call decodes ``ids[prefix:]`` and emits the
    part after it, unless that ends in U+FFFD (an incomplete UTF-8 sequence split across
    tokens), in which case nothing is emitted until the character completes. Emitted text then
    passes through a :class:`StopStringMatcher`.

    ``text`` is everything emitted so far; ``output_ids`` every id added. After a stop string
    matched, ``stop_matched`` is that string and further tokens are ignored.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._stop = StopStringMatcher(stop)
        self.text = ""
        self.output_ids: list[int] = []

    @property
    def stop_matched(self) -> str | None:
        return self._stop.matched

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ``token_ids`` and return the newly releasable text (possibly "")."""
        if self._stop.matched is not None:
            return ""
        self.output_ids.extend(int(t) for t in token_ids)
        self._ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(delta)

    def finish(self) -> str:
        """End of stream: release any held text (an unfinished character is emitted as
        decoded, i.e. with U+FFFD, since no more bytes will come). Returns the new text."""
        if self._stop.matched is not None:
            return ""
        out = ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            new_text = self._decode(self._ids[self._prefix:])
            self._prefix, self._read = self._read, len(self._ids)
            if len(new_text) > len(prefix_text):
                out = self._release(new_text[len(prefix_text):])
        tail = self._stop.flush()
        self.text += tail
        return out + tail

    def _release(self, delta: str) -> str:
        out = self._stop.feed(delta)
        self.text += out
        return out
