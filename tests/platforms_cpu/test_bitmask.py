"""apply_token_bitmask: exact, in place, with and without indices, short bitmasks."""

from __future__ import annotations

import pytest
import torch

from heteroserve.platforms.cpu.bitmask import apply_token_bitmask


def _random_bitmask(rows: int, words: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2**32, (rows, words), generator=gen, dtype=torch.int64)
    return (raw - (raw >= 2**31).long() * 2**32).to(torch.int32)  # includes negative words


def _reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    words = bitmask.shape[1]
    for i, r in enumerate(rows):
        for t in range(logits.shape[1]):
            allowed = t < 32 * words and (int(bitmask[i, t // 32]) >> (t % 32)) & 1
            if not allowed:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab,words", [(64, 2), (70, 3), (100, 2), (31, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_all_rows(vocab: int, words: int, dtype: torch.dtype) -> None:
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    bitmask = _random_bitmask(3, words, vocab)
    want = _reference(logits, bitmask, [0, 1, 2])
    ptr = logits.data_ptr()
    assert apply_token_bitmask(logits, bitmask) is None
    assert logits.data_ptr() == ptr and torch.equal(logits, want)


def test_apply_with_indices() -> None:
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    bitmask = _random_bitmask(2, 2, 1)
    want = _reference(logits, bitmask, [3, 0])
    apply_token_bitmask(logits, bitmask, torch.tensor([3, 0], dtype=torch.int32))
    assert torch.equal(logits, want)
    assert torch.isfinite(logits[[1, 2, 4]]).all()


def test_all_allowed_is_identity_and_bit_order() -> None:
    logits = torch.randn(1, 64)
    before = logits.clone()
    apply_token_bitmask(logits, torch.full((1, 2), -1, dtype=torch.int32))
    assert torch.equal(logits, before)
    apply_token_bitmask(logits, torch.tensor([[1 << 5, 1]], dtype=torch.int32))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5, 32]


def test_errors() -> None:
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="no indices"):
        apply_token_bitmask(torch.zeros(2, 8), torch.zeros(1, 1, dtype=torch.int32))
