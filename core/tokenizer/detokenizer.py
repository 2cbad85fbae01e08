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

    With a fast (Rust) tokenizer it uses the tokenizers library's ``DecodeStream`` (one call
    per token, seeded with the prompt's last tokens for context). Otherwise it uses two offsets
    into its id window (as the established engines do): the text of ``ids[prefix:read]`` was
    already emitted; each call decodes ``ids[prefix:]`` and emits the part after it. Either
    way nothing is emitted while the text ends inside a UTF-8 character split across tokens.
    Emitted text then passes through a :class:`StopStringMatcher`.

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
        self._stream = _decode_stream(tokenizer, context, skip_special_tokens)

    @property
    def stop_matched(self) -> str | None:
        return self._stop.matched

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int], check_stop: bool = True) -> str:
        """Append ``token_ids`` and return the newly releasable text (possibly "").
        ``check_stop`` False: the text passes the stop strings unmatched
        (:meth:`StopStringMatcher.feed`)."""
        if self._stop.matched is not None:
            return ""
        self.output_ids.extend(int(t) for t in token_ids)
        self._ids.extend(int(t) for t in token_ids)
        if self._stream is not None:
            return self._release(self._step_stream(token_ids), check_stop)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(delta, check_stop)

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

    def _step_stream(self, token_ids: Sequence[int]) -> str:
        out = []
        raw = self._tok.hf._tokenizer
        base = len(self._ids) - len(token_ids)
        for j, tid in enumerate(token_ids):
            piece = self._stream.step(raw, int(tid))
            if piece is not None:
                out.append(piece)
                self._read = base + j + 1  # everything up to here is emitted
        if out:  # finish() decodes what is held from a few tokens back, for context
            self._prefix = max(0, self._read - CONTEXT_TOKENS)
        return "".join(out)

    def _release(self, delta: str, check_stop: bool = True) -> str:
        out = self._stop.feed(delta, check_stop)
        self.text += out
        return out


def _decode_stream(tokenizer: Tokenizer, context: list[int], skip_special_tokens: bool
                   ) -> object | None:
    """A ``tokenizers.decoders.DecodeStream`` seeded with ``context``, or None when the
    tokenizer is not a fast one (or the library has no ``DecodeStream``)."""
    if getattr(tokenizer.hf, "_tokenizer", None) is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    return DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
