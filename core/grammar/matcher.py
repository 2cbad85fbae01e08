"""Per-request grammar state in the engine process, and batched bitmask filling."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch


class GrammarMatcher:
    """Tracks one request's position in its grammar.

    Built from the serialised grammar the frontend compiled. ``accept(token)`` advances it
    (False means the token was illegal, which a correctly masked sampler never produces);
    ``is_terminated()`` is True once the grammar reached an accepting end (the request then
    finishes with reason ``stop``). ``rollback(n)`` undoes the last ``n`` accepted tokens.
    """

    def __init__(self, serialized: str, tokenizer_info: Any, json_output: bool = False) -> None:
        import xgrammar as xgr

        compiled = xgr.CompiledGrammar.deserialize_json(serialized, tokenizer_info)
        self._matcher = xgr.GrammarMatcher(compiled)
        self._no_controls = control_free_mask(tokenizer_info) if json_output else None
        self.active = True  # False while a reasoning section is open (grammar not yet applied)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, xgrammar layout).

        For JSON grammars, tokens holding raw control bytes (U+0000..U+001F) are also masked:
        xgrammar's JSON string rule admits them, but JSON parsers reject them inside strings,
        and compact JSON needs no raw whitespace control characters.
        """
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._no_controls is not None:
            bitmask[row] &= self._no_controls

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)


_CONTROL_FREE: dict[int, torch.Tensor] = {}


def control_free_mask(tokenizer_info: Any) -> torch.Tensor:
    """int32 ``[W]`` bitmask allowing every token whose bytes hold no byte below 0x20
    (special tokens such as EOS stay allowed; the grammar decides about them)."""
    key = id(tokenizer_info)
    if key not in _CONTROL_FREE:
        vocab = tokenizer_info.decoded_vocab
        special = set(tokenizer_info.special_token_ids) | set(tokenizer_info.stop_token_ids)
        allowed = torch.tensor([i in special or not any(b < 0x20 for b in tok)
                                for i, tok in enumerate(vocab)], dtype=torch.bool)
        width = bitmask_width(tokenizer_info.vocab_size)
        allowed = torch.nn.functional.pad(allowed, (0, width * 32 - allowed.numel()))
        bits = allowed.view(width, 32).to(torch.int64) << torch.arange(32)
        _CONTROL_FREE[key] = bits.sum(dim=1).to(torch.int64).apply_(
            lambda v: v - (1 << 32) if v >= (1 << 31) else v).to(torch.int32)
    return _CONTROL_FREE[key]


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask covering ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


class BitmaskFiller:
    """Fills a batch's bitmask on the host in a worker thread, so that it overlaps the forward
    pass; :meth:`result` hands back ``(bitmask, rows)`` ready to move to the device.

    Rows of unconstrained requests are not in ``rows``; the bitmask op is applied only to
    ``rows`` (its ``indices`` argument), so unconstrained requests are untouched.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "grammar-mask")
        self._future: concurrent.futures.Future | None = None

    def start(self, matchers: list[GrammarMatcher | None], vocab_size: int) -> None:
        rows = [i for i, m in enumerate(matchers) if m is not None and m.active]
        self._future = self._pool.submit(self._fill, matchers, rows, vocab_size) if rows else None

    @staticmethod
    def _fill(matchers: list[GrammarMatcher | None], rows: list[int],
              vocab_size: int) -> tuple[torch.Tensor, list[int]]:
        bitmask = torch.empty((len(rows), bitmask_width(vocab_size)), dtype=torch.int32)
        for out_row, i in enumerate(rows):
            matchers[i].fill(bitmask, out_row)  # type: ignore[union-attr]
        return bitmask, rows

    def result(self) -> tuple[torch.Tensor, list[int]] | None:
        """Wait for the fill started by :meth:`start`; None when no row is constrained."""
        if self._future is None:
            return None
        out, self._future = self._future.result(), None
        return out
