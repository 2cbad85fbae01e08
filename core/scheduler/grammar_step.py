"""Grammar-constrained decoding inside a step: fill masks on the host while the device runs
the forward pass, apply them through the dispatch table, advance matchers after sampling."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from heteroserve.core.grammar.matcher import BitmaskFiller, GrammarMatcher
from heteroserve.core.scheduler.request import Req


class BitmaskRunner(Protocol):
    """What mask application needs from the model runner: its platform's bitmask op."""

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor) -> None: ...


class GrammarStep:
    """Owns the xgrammar tokenizer info and the mask filler. ``think_end_id``: with a
    reasoning parser, a request's grammar starts only after this token was generated."""

    def __init__(self, tokenizer_info: Any | None, vocab_size: int,
                 think_end_id: int | None = None) -> None:
        self.info, self.vocab_size, self.think_end_id = tokenizer_info, vocab_size, think_end_id
        self.filler = BitmaskFiller()

    def attach(self, req: Req) -> None:
        """Build ``req.grammar`` from its serialised grammar. ``ValueError`` if the engine
        has no tokenizer info to rebuild grammars with."""
        sp = req.sampling_params
        if not sp.grammar:
            return
        if self.info is None:
            raise ValueError("this engine was started without grammar support")
        req.grammar = GrammarMatcher(sp.grammar, self.info, json_output=sp.grammar_json_output)
        self._refresh(req)  # kept across retraction: its outputs stay, so does its state

    def _refresh(self, req: Req) -> None:
        if self.think_end_id is not None and req.grammar is not None:
            req.grammar.active = self.think_end_id in req.output_ids

    def start(self, reqs: list[Req]) -> None:
        """Begin filling masks for the sampled rows (call before the forward pass)."""
        self.filler.start([r.grammar for r in reqs], self.vocab_size)

    def apply(self, runner: BitmaskRunner, logits: torch.Tensor) -> None:
        """Wait for the masks and apply them to ``logits`` in place (through the runner's
        platform op)."""
        result = self.filler.result()
        if result is None:
            return
        bitmask, rows = result
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device)
        runner.apply_token_bitmask(logits, bitmask.to(logits.device), index)

    def advance(self, req: Req, token: int) -> bool:
        """Feed the sampled token to the matcher; True when the grammar has terminated."""
        g = req.grammar
        if g is None:
            return False
        if not g.active:
            self._refresh(req)
            return False
        g.accept(token)
        return g.is_terminated()
