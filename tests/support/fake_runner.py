"""A model runner stand-in for fast scheduler tests.

It keeps a token-id "KV cache" (one slot per page slot): ``forward`` writes each new token at
its ``out_cache_loc`` slot, then reads every sequence's whole history back through the page
table. A slot that was never written (or a history that differs from what the scheduler
meant, because of a wrong page, a page freed and reused by someone else, a bad prefix
match) changes the logits, so wrong paging shows up as changed outputs. Logits are a
deterministic function of the history read back: ``randn(vocab)`` seeded by a hash of the
last three tokens and the position.
"""

from __future__ import annotations

import zlib

import torch
from heteroserve.core.model_runner.forward_batch import ForwardBatch
from heteroserve.platforms.cpu.bitmask import apply_token_bitmask
from heteroserve.platforms.cpu.sampling import sample

UNWRITTEN = -1


class FakeModelRunner:
    """Exposes the attributes and ``forward`` the scheduler uses. ``num_pages`` includes the
    reserved page 0. ``histories`` records, per forward call, the token histories read back."""

    def __init__(self, num_pages: int = 256, page_size: int = 4, vocab_size: int = 48,
                 max_context_len: int = 4096) -> None:
        self.page_size, self.num_pages, self.vocab_size = page_size, num_pages, vocab_size
        self.max_total_tokens = (num_pages - 1) * page_size
        self.max_context_len = max_context_len
        self.device = torch.device("cpu")
        self.kv = torch.full((num_pages * page_size,), UNWRITTEN, dtype=torch.int64)
        self.forward_calls = 0
        self.histories: list[list[list[int]]] = []

    @staticmethod
    def sample(logits: torch.Tensor, params) -> torch.Tensor:
        return sample(logits, params)

    @staticmethod
    def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
        apply_token_bitmask(logits, bitmask, rows)

    @staticmethod
    def new_event() -> None:
        return None  # no device events: the scheduler takes the synchronous path

    def history(self, batch: ForwardBatch, b: int) -> list[int]:
        """Token ids in sequence ``b``'s KV slots, read through its page table."""
        meta = batch.attn
        lo, hi = int(meta.kv_page_indptr[b]), int(meta.kv_page_indptr[b + 1])
        pages = meta.kv_page_indices[lo:hi].to(torch.int64)
        slots = (pages[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)
        return self.kv[slots[: int(meta.seq_lens[b])]].tolist()

    def logits_for(self, history: list[int]) -> torch.Tensor:
        """The fake model: fp32 ``[vocab]`` from the last three tokens and the position."""
        key = f"{history[-3:]}:{len(history)}".encode()
        gen = torch.Generator().manual_seed(zlib.crc32(key))
        return torch.randn(self.vocab_size, generator=gen) * 3.0

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Write the new tokens' slots, read histories back, return fp32 ``[B, vocab]``."""
        if bool((batch.attn.out_cache_loc < self.page_size).any()):
            raise AssertionError("a token was written into reserved page 0")
        self.kv[batch.attn.out_cache_loc] = batch.input_ids
        self.forward_calls += 1
        hists = [self.history(batch, b) for b in range(batch.batch_size)]
        self.histories.append(hists)
        return torch.stack([self.logits_for(h) for h in hists])


def reference_greedy(runner: FakeModelRunner, prompt: list[int], max_new_tokens: int,
                     stop: set[int] = frozenset()) -> list[int]:
    """What greedy decoding must produce, computed straight from the fake model."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(runner.logits_for(ids).argmax())
        out.append(token)
        ids.append(token)
        if token in stop:
            break
    return out
