"""The cpu decode K/V mirror: steps announced by ``prepare`` refresh only what changed, and
the output equals a gather of the paged cache, also when rows shift, a retracted sequence's
freed page is reused at the same row and position, or an extend step comes between."""

from __future__ import annotations

import math

import torch

from heteroserve.conformance.paged import metadata_for
from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer, ForwardMode
from heteroserve.platforms.cpu.attention import TorchNativeAttention

HQ, HK, D, PS, PAGES = 4, 2, 64, 4, 64


class _Engine:
    """Sequences over a free list of pages, stepped like the engine steps them: prepare,
    then per layer write_kv and attention."""

    def __init__(self, layers: int, seed: int = 0, through_forward: bool = False) -> None:
        #: ``through_forward``: each layer calls ``forward`` (write, then attend with the rows
        #: just written handed to the mirror) instead of ``write_kv`` and ``decode``
        self.through_forward = through_forward
        self.gen = torch.Generator().manual_seed(seed)
        cfg = AttentionConfig(num_q_heads=HQ, num_kv_heads=HK, head_size=D, page_size=PS,
                              dtype=torch.float32, device=torch.device("cpu"))
        self.backend = TorchNativeAttention(cfg)
        self.caches = [tuple(torch.zeros(self.backend.kv_cache_shape(PAGES))
                             for _ in range(2)) for _ in range(layers)]
        self.layers = [AttentionLayer(layer_id=i, scale=1 / math.sqrt(D)) for i in range(layers)]
        self.free = list(range(1, PAGES))
        self.seqs: list[tuple[int, list[int]]] = []  # (length, pages)

    def add(self, length: int) -> None:
        self.seqs.append((0, []))
        self._grow(len(self.seqs) - 1, length)
        self._step({len(self.seqs) - 1: length}, ForwardMode.EXTEND)

    def retract(self, row: int) -> None:
        _, pages = self.seqs.pop(row)
        self.free[:0] = pages  # reused first, as an allocator's free list would

    def decode(self) -> list[torch.Tensor]:
        for b in range(len(self.seqs)):
            self._grow(b, 1)
        return self._step({b: 1 for b in range(len(self.seqs))}, ForwardMode.DECODE)

    def _grow(self, b: int, n: int) -> None:
        length, pages = self.seqs[b]
        while len(pages) * PS < length + n:
            pages.append(self.free.pop(0))
        self.seqs[b] = (length + n, pages)

    def _step(self, new: dict[int, int], mode: ForwardMode) -> list[torch.Tensor]:
        rows = sorted(new)
        seqs = tuple((self.seqs[b][0] - new[b], new[b]) for b in rows)
        meta = metadata_for([self.seqs[b][1] for b in rows], seqs, PS, mode,
                            torch.device("cpu"))
        self.backend.prepare(meta)
        tokens = sum(new.values())
        outs = []
        for layer, (k_cache, v_cache) in zip(self.layers, self.caches):
            k, v = (torch.randn(tokens, HK, D, generator=self.gen) for _ in range(2))
            q = torch.randn(tokens, HQ, D, generator=self.gen)
            if self.through_forward:
                out = self.backend.forward(q, k, v, k_cache, v_cache, layer, meta)
            else:
                self.backend.write_kv(k, v, k_cache, v_cache, meta)
                fn = self.backend.decode if mode is ForwardMode.DECODE else self.backend.extend
                out = fn(q, k_cache, v_cache, layer, meta)
            ref = TorchNativeAttention(self.backend.config).decode(
                q, k_cache, v_cache, layer, meta) if mode is ForwardMode.DECODE else out
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
            outs.append(out)
        return outs


def test_mirror_refreshes_only_new_positions_and_matches_a_gather() -> None:
    eng = _Engine(layers=3)
    for n in (5, 9, 2):
        eng.add(n)
    eng.decode()  # the first decode step gathers fully
    assert eng.backend._mirror.planned_refresh is None
    for _ in range(6):
        eng.decode()
        # a new token per sequence, and a padding column (a copy of position 0) of the two
        # shorter ones
        assert eng.backend._mirror.planned_refresh == 3 + 2


def test_steady_steps_copy_the_written_rows_and_match_a_gather() -> None:
    eng = _Engine(layers=3, seed=2, through_forward=True)
    for _ in range(3):
        eng.add(7)  # equal lengths: each step only the written token changes
    eng.decode()
    assert not eng.backend._mirror.steady  # the first decode step gathers fully
    for _ in range(5):  # crosses page boundaries (PS = 4): new slots in new pages
        eng.decode()
        assert eng.backend._mirror.steady and eng.backend._mirror.planned_refresh == 3
    eng.retract(1)  # rows shift: not steady, a refresh from the caches
    eng.decode()
    assert not eng.backend._mirror.steady
    eng.decode()
    assert eng.backend._mirror.steady


def test_mirror_after_retraction_reuses_a_freed_slot_at_the_same_row_and_position() -> None:
    eng = _Engine(layers=2, seed=1)
    for _ in range(3):
        eng.add(PS * 2)      # rows 0-2
    eng.add(PS * 3)          # row 3: retracted below
    eng.add(PS * 2 - 2)      # row 4: moves to row 3
    eng.decode()
    eng.decode()             # row 3 at 3PS+2, row 4 at 2PS
    reused = eng.seqs[3][1][2]  # row 3's page of positions 2PS..3PS-1
    eng.retract(3)
    eng.free.remove(reused)
    eng.free.insert(0, reused)
    eng.decode()  # the new row 3 writes position 2PS into the slot the old row 3 had there
    assert eng.seqs[3][1][2] == reused
    assert eng.backend._mirror.planned_refresh is not None
    eng.decode()


def test_an_extend_step_resets_the_mirror() -> None:
    eng = _Engine(layers=2, seed=2)
    eng.add(7)
    eng.decode()
    eng.decode()
    eng.retract(0)
    eng.add(7)  # prefill may reuse every freed slot
    eng.decode()
    assert eng.backend._mirror.planned_refresh is None
    eng.decode()
    assert eng.backend._mirror.planned_refresh == 1


def test_decode_without_prepare_gathers() -> None:
    eng = _Engine(layers=1, seed=3)
    eng.add(6)
    eng.decode()
    eng.decode()
    seqs = ((eng.seqs[0][0] - 1, 1),)
    meta = metadata_for([eng.seqs[0][1]], seqs, PS, ForwardMode.DECODE, torch.device("cpu"))
    k_cache, v_cache = eng.caches[0]
    k_cache.view(-1, HK, D)[:].mul_(2.0)  # a change the mirror cannot see
    q = torch.randn(1, HQ, D)
    out = eng.backend.decode(q, k_cache, v_cache, eng.layers[0], meta)
    ref = TorchNativeAttention(eng.backend.config).decode(q, k_cache, v_cache, eng.layers[0], meta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not eng.backend._mirror.active
