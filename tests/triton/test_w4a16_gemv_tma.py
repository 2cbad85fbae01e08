"""``platforms/triton/w4a16_gemv_tma.py`` under the Triton interpreter (host-side tensor
descriptors run there): the TMA-pipelined one-row 4-bit GEMV against the float64 product of
the dequantized weights, on ragged shapes (word rows and columns past the last whole tile
read as zero from the descriptor), with bias, both nibble decodings and each pipeline depth;
and the shapes it refuses."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and
                                not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

from heteroserve.platforms.triton.w4a16_gemv_tma import (  # noqa: E402
    W4TmaConfig, fits, w4a16_gemv_tma,
)
from heteroserve.platforms.triton.w4a16_pack import random_packed, unpack_rows  # noqa: E402


def _case(m: int, n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    words, zeros, scales = random_packed(gen, k, n, group)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    return x, words, zeros, scales, bias


def _reference(x, words, zeros, scales, group, bias):
    k = x.shape[1]
    g = torch.arange(k) // group
    w = (unpack_rows(words)[:k].double() - zeros.double()[g]) * scales.double()[g]
    return x.double() @ w + bias.double()


@pytest.mark.parametrize("m,n,k,group,cfg", [
    (1, 64, 512, 128, W4TmaConfig(16, 32, 1, 2)),
    (2, 40, 320, 64, W4TmaConfig(16, 16, 1, 3)),  # ragged N and a partial last tile
    (1, 36, 1024, 32, W4TmaConfig(8, 64, 1, 2, "exponent")),
    (3, 128, 256, 128, W4TmaConfig(32, 32, 1, 1)),
])
def test_matches_the_float64_product(m, n, k, group, cfg) -> None:
    x, words, zeros, scales, bias = _case(m, n, k, group, m * n + k)
    y = w4a16_gemv_tma(x, words, zeros, scales, group, cfg, bias=bias)
    ref = _reference(x, words, zeros, scales, group, bias)
    assert y.shape == (m, n) and y.dtype == x.dtype
    # bf16 output: one rounding of the result (2**-8 relative)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3


def test_refuses_what_it_cannot_take() -> None:
    x, words, zeros, scales, _ = _case(1, 64, 512, 128, 0)
    assert not fits(62, 512, 128, 32)  # a row of 62 words is not 16-byte aligned
    assert not fits(64, 8 * 13, 32, 32)  # 13 word rows: not a multiple of 4 per thread
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_gemv_tma(x, words[:, :62], zeros[:, :62], scales[:, :62], 128,
                       W4TmaConfig(16, 32, 1, 2))
    with pytest.raises(ValueError, match="unknown nibble"):
        w4a16_gemv_tma(x, words, zeros, scales, 128, W4TmaConfig(16, 32, 1, 2, "magic"))
