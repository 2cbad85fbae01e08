"""The batch builder's metadata against hand-computed values, and KV pool sizing."""

from __future__ import annotations

import random

import pytest
import torch

from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.kv_storage import GIB, plan_num_pages


def test_extend_metadata_by_hand() -> None:
    # page size 4: seq A has 5 cached + 3 new (8 tokens, pages [7, 2]); seq B has 0 + 1 on
    # page [9] with a spare page that must not appear in the page table
    seqs = [SequenceInput([10, 11, 12], 5, [7, 2]), SequenceInput([20], 0, [9, 3])]
    b = build_forward_batch(seqs, ForwardMode.EXTEND, 4, torch.device("cpu"))
    m = b.attn
    assert b.input_ids.tolist() == [10, 11, 12, 20]
    assert b.positions.tolist() == [5, 6, 7, 0]
    assert b.logits_indices.tolist() == [2, 3]
    assert m.qo_indptr.tolist() == [0, 3, 4]
    assert m.seq_lens.tolist() == [8, 1] and m.seq_lens_cpu == [8, 1]
    assert m.prefix_lens.tolist() == [5, 0] and m.prefix_lens_cpu == [5, 0]
    assert m.kv_page_indptr.tolist() == [0, 2, 3]
    assert m.kv_page_indices.tolist() == [7, 2, 9]
    assert m.kv_last_page_len.tolist() == [4, 1]
    assert m.out_cache_loc.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4]
    assert m.out_cache_loc.dtype == torch.int64 and m.qo_indptr.dtype == torch.int32
    assert b.batch_size == 2


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_positions_and_slots_match_per_token_formula(page_size: int, mode: ForwardMode) -> None:
    rng = random.Random(page_size)
    seqs = []
    for i in range(7):
        n_new = 1 if mode is ForwardMode.DECODE else rng.choice([1, 3, page_size + 1, 40])
        prefix = rng.choice([0, 1, page_size - 1, 2 * page_size + 3])
        n_pages = -(-(prefix + n_new) // page_size) + rng.choice([0, 2])
        seqs.append(SequenceInput([rng.randrange(50) for _ in range(n_new)], prefix,
                                  rng.sample(range(1000), n_pages), all_logits=i == 2))
    b = build_forward_batch(seqs, mode, page_size, torch.device("cpu"))
    want_pos = [p for s in seqs for p in range(s.prefix_len, s.prefix_len + len(s.new_token_ids))]
    want_loc = [s.pages[p // page_size] * page_size + p % page_size
                for s in seqs for p in range(s.prefix_len, s.prefix_len + len(s.new_token_ids))]
    assert b.positions.tolist() == want_pos
    assert b.attn.out_cache_loc.tolist() == want_loc
    assert b.input_ids.tolist() == [t for s in seqs for t in s.new_token_ids]
    assert b.attn.kv_page_indices.tolist() == [
        p for s in seqs for p in s.pages[:-(-(s.prefix_len + len(s.new_token_ids)) // page_size)]]
    ends = torch.cumsum(torch.tensor([len(s.new_token_ids) for s in seqs]), 0).tolist()
    want_rows = [r for s, e in zip(seqs, ends)
                 for r in range(e - s.num_logit_rows, e)]
    assert b.logits_indices.tolist() == want_rows


def test_bad_sequences_are_rejected() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="needs 2 pages"):
        build_forward_batch([SequenceInput([1, 2], 3, [1])], ForwardMode.EXTEND, 4, cpu)
    with pytest.raises(ValueError, match="decode sequence with 2"):
        build_forward_batch([SequenceInput([1, 2], 0, [1])], ForwardMode.DECODE, 4, cpu)


def test_kv_pool_sizing() -> None:
    page = 1 << 20  # 1 MiB per page
    # 10 GiB free of 16 GiB at fraction 0.9: 10 - 1.6 = 8.4 GiB of pages
    assert plan_num_pages(10 * GIB, 16 * GIB, 0.9, page, 16, None, 10**9) == int(8.4 * 1024)
    # a platform cap (host memory) bounds it
    assert plan_num_pages(10 * GIB, 16 * GIB, 0.9, page, 16, None, 10**9, 4 * GIB) == 4096
    # max_total_tokens and the context cap bound it (+1 for the reserved page 0)
    assert plan_num_pages(10 * GIB, 16 * GIB, 0.9, page, 16, 1600, 10**9) == 101
    assert plan_num_pages(10 * GIB, 16 * GIB, 0.9, page, 16, None, 320) == 21
    with pytest.raises(RuntimeError, match="no memory left"):
        plan_num_pages(GIB, 16 * GIB, 0.9, page, 16, None, 10**9)
