"""TorchNativeAttention (NHD and HND) against a float64 per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from heteroserve.core.kernels.attention import (
    AttentionConfig, AttentionLayer, AttentionMetadata, ForwardMode,
)
from heteroserve.platforms.cpu import attention as attn_mod
from heteroserve.platforms.cpu.attention import TorchNativeAttention, TorchNativeAttentionHND


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
               layer: AttentionLayer) -> torch.Tensor:
    """q [n, Hq, D] (positions prefix..), k/v [L, Hk, D] -> [n, Hq, D], float64 loops."""
    n, hq, _ = q.shape
    hk = k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(n):
        p = prefix + i
        lo = 0 if layer.sliding_window is None else max(0, p - layer.sliding_window + 1)
        for h in range(hq):
            kh = h // (hq // hk)
            s = (k[lo:p + 1, kh].double() @ q[i, h].double()) * layer.scale
            if layer.logit_cap is not None:
                s = layer.logit_cap * torch.tanh(s / layer.logit_cap)
            out[i, h] = torch.softmax(s, 0) @ v[lo:p + 1, kh].double()
    return out


class _Batch:
    """Random sequences scattered over shuffled pages, with their metadata."""

    def __init__(self, lens: list[tuple[int, int]], page_size: int, hq: int, hk: int, d: int,
                 dtype: torch.dtype, mode: ForwardMode, gen: torch.Generator) -> None:
        self.lens = lens
        ps = page_size
        counts = [-(-(p + n) // ps) for p, n in lens]
        num_pages = sum(counts) + 3
        perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 reserved
        self.pages, at = [], 0
        for c in counts:
            self.pages.append(perm[at:at + c])
            at += c
        self.num_pages = num_pages
        self.k = [torch.randn(p + n, hk, d, generator=gen).to(dtype) for p, n in lens]
        self.v = [torch.randn(p + n, hk, d, generator=gen).to(dtype) for p, n in lens]
        self.q = [torch.randn(n, hq, d, generator=gen).to(dtype) for _, n in lens]
        slot = lambda b, pos: self.pages[b][pos // ps] * ps + pos % ps  # noqa: E731
        new_slots = [slot(b, p + i) for b, (p, n) in enumerate(lens) for i in range(n)]
        qo = [0]
        for _, n in lens:
            qo.append(qo[-1] + n)
        page_indptr = [0]
        for c in counts:
            page_indptr.append(page_indptr[-1] + c)
        seq_lens = [p + n for p, n in lens]
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        self.meta = AttentionMetadata(
            mode=mode, page_size=ps, qo_indptr=i32(qo), seq_lens=i32(seq_lens),
            prefix_lens=i32([p for p, _ in lens]), kv_page_indptr=i32(page_indptr),
            kv_page_indices=i32([pg for pages in self.pages for pg in pages]),
            kv_last_page_len=i32([(s - 1) % ps + 1 for s in seq_lens]),
            out_cache_loc=torch.tensor(new_slots, dtype=torch.int64),
            seq_lens_cpu=seq_lens, prefix_lens_cpu=[p for p, _ in lens])
        self.slot = slot

    def caches(self, backend: TorchNativeAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """NaN-poisoned caches holding every prefix token (written independently of the
        backend). Also sets ``self.expected``: the caches as they must be after write_kv."""
        shape = backend.kv_cache_shape(self.num_pages)
        dtype = self.k[0].dtype
        caches = [torch.full(shape, float("nan"), dtype=dtype) for _ in range(2)]
        expected = [c.clone() for c in caches]
        ps = self.meta.page_size
        for b, (p, n) in enumerate(self.lens):
            for pos in range(p + n):
                s = self.slot(b, pos)
                for cache_list in ((caches, expected) if pos < p else (expected,)):
                    for c, src in zip(cache_list, (self.k[b], self.v[b])):
                        if backend.kv_layout.value == "NHD":
                            c[s // ps, s % ps] = src[pos]
                        else:
                            c[s // ps, :, s % ps] = src[pos]
        self.expected = expected
        return caches[0], caches[1]

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        ks = [k[p:] for k, (p, _) in zip(self.k, self.lens)]
        vs = [v[p:] for v, (p, _) in zip(self.v, self.lens)]
        return torch.cat(ks), torch.cat(vs)


def _run(backend_cls: type, lens: list[tuple[int, int]], page_size: int, hq: int, hk: int,
         d: int, dtype: torch.dtype, window: int | None, cap: float | None,
         mode: ForwardMode = ForwardMode.EXTEND, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    cfg = AttentionConfig(num_q_heads=hq, num_kv_heads=hk, head_size=d, page_size=page_size,
                          dtype=dtype, device=torch.device("cpu"))
    backend = backend_cls(cfg)
    batch = _Batch(lens, page_size, hq, hk, d, dtype, mode, gen)
    k_cache, v_cache = batch.caches(backend)
    layer = AttentionLayer(layer_id=0, scale=2.0 / math.sqrt(d), sliding_window=window,
                           logit_cap=cap)
    backend.prepare(batch.meta)
    k_new, v_new = batch.new_kv()
    out = backend.forward(torch.cat(batch.q), k_new, v_new, k_cache, v_cache, layer, batch.meta)
    for got, want in zip((k_cache, v_cache), batch.expected):
        assert torch.equal(got.isnan(), want.isnan()), "write_kv touched the wrong slots"
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert out.dtype == dtype and out.shape == (sum(n for _, n in lens), hq, d)
    ref = torch.cat([_reference(q, k, v, p, layer)
                     for q, k, v, (p, _) in zip(batch.q, batch.k, batch.v, lens)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


EXTEND_LENS = [(0, 1), (0, 7), (5, 3), (17, 1), (3, 20)]


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("hq,hk", [(4, 2), (2, 2), (8, 1)])
def test_extend_gqa_page_sizes(page_size: int, hq: int, hk: int) -> None:
    _run(TorchNativeAttention, EXTEND_LENS, page_size, hq, hk, 64, torch.float32, None, None)


@pytest.mark.parametrize("window,cap", [(4, None), (None, 5.0), (3, 5.0), (1, None)])
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_window_and_softcap(window: int | None, cap: float | None, mode: ForwardMode) -> None:
    lens = EXTEND_LENS if mode is ForwardMode.EXTEND else [(0, 1), (6, 1), (33, 1), (16, 1)]
    _run(TorchNativeAttention, lens, 16, 4, 2, 64, torch.float32, window, cap, mode)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode(page_size: int, dtype: torch.dtype) -> None:
    lens = [(0, 1), (6, 1), (33, 1), (15, 1), (16, 1)]
    _run(TorchNativeAttention, lens, page_size, 4, 2, 128, dtype, None, None, ForwardMode.DECODE)


def test_extend_bf16_and_hnd_layout() -> None:
    _run(TorchNativeAttention, EXTEND_LENS, 16, 4, 2, 64, torch.bfloat16, None, 8.0)
    _run(TorchNativeAttentionHND, EXTEND_LENS, 3, 4, 2, 64, torch.float32, 5, None)
    _run(TorchNativeAttentionHND, [(4, 1), (9, 1)], 3, 4, 2, 64, torch.float32, None, 5.0,
         ForwardMode.DECODE)


def test_long_extend_is_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_SCORE_BUDGET", 4 * 40 * 5)  # a few query rows per chunk
    _run(TorchNativeAttention, [(7, 33), (0, 9)], 4, 4, 2, 64, torch.float32, 6, None)
    _run(TorchNativeAttention, [(7, 33)], 4, 4, 2, 64, torch.float32, None, 3.0)


def test_bad_shapes_raise() -> None:
    cfg = AttentionConfig(4, 2, 64, 16, torch.float32, torch.device("cpu"))
    backend = TorchNativeAttention(cfg)
    batch = _Batch([(0, 3)], 16, 4, 2, 64, torch.float32, ForwardMode.EXTEND,
                   torch.Generator().manual_seed(0))
    k_cache, v_cache = batch.caches(backend)
    layer = AttentionLayer(0, 0.125)
    with pytest.raises(ValueError, match="q must be"):
        backend.extend(torch.zeros(3, 2, 64), k_cache, v_cache, layer, batch.meta)
    with pytest.raises(ValueError, match="rows"):
        backend.extend(torch.zeros(2, 4, 64), k_cache, v_cache, layer, batch.meta)
    with pytest.raises(ValueError, match="write_kv"):
        backend.write_kv(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), k_cache, v_cache,
                         batch.meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equal_lengths_and_prefilled_prefix(dtype: torch.dtype) -> None:
    # equal lengths: no mask at all; a long prefix crossing pages; GQA 8:2
    _run(TorchNativeAttention, [(20, 1), (20, 1), (20, 1)], 8, 8, 2, 64, dtype, None, None,
         ForwardMode.DECODE)
    _run(TorchNativeAttention, [(0, 12), (0, 12)], 4, 8, 2, 64, dtype, None, None)
