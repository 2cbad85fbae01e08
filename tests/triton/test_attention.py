"""TritonAttention (KV write, extend with cached prefix, split-KV decode) against a dense
float64 reference, on small fp32 shapes (interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_refs import attention_ref, rel_err

from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer, ForwardMode

SENTINEL = 1234.5
FP8_SENTINEL = 96.0  # exactly representable in e4m3 (a device cast of 1234.5 gives NaN)


def _run(device: torch.device, mode: ForwardMode, seqs: tuple[tuple[int, int], ...],
         hq: int, hk: int, d: int, page: int, window: int | None, cap: float | None,
         seed: int, max_context_len: int = 8192, cache_dtype: torch.dtype | None = None) -> None:
    from heteroserve.platforms.triton.attention import TritonAttention

    def cached(x: torch.Tensor) -> torch.Tensor:  # what the cache holds, read back
        if cache_dtype is None:
            return x
        fmax = torch.finfo(cache_dtype).max
        return x.clamp(-fmax, fmax).to(cache_dtype).to(x.dtype)

    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(seqs, page, mode, device, gen)
    meta = batch.meta
    cfg = AttentionConfig(hq, hk, d, page, torch.float32, device,
                          max_context_len=max_context_len, kv_cache_dtype=cache_dtype)
    backend = TritonAttention(cfg)
    shape = backend.kv_cache_shape(batch.num_pages)
    sentinel = SENTINEL if cache_dtype is None else FP8_SENTINEL
    k_cache = torch.full(shape, sentinel, device=device).to(cfg.cache_dtype)
    v_cache = torch.full(shape, sentinel, device=device).to(cfg.cache_dtype)
    spread = 100.0 if cache_dtype is not None else 1.0
    full_k = [torch.randn(p + n, hk, d, generator=gen) * spread for p, n in seqs]
    full_v = [torch.randn(p + n, hk, d, generator=gen) for p, n in seqs]
    if cache_dtype is not None:
        # values the cache holds exactly (the interpreter's fp32 -> fp8 rounding is wrong at
        # binade edges), and some beyond its range, to check that writes saturate
        full_k = [cached(x) for x in full_k]
        full_v = [cached(x) for x in full_v]
        for x in full_k:
            x[::3, 0, :4] = torch.tensor([1000.0, -1000.0, 449.0, -3000.0])
    for b, (p, _) in enumerate(seqs):  # the cached prefix, written by the test itself
        slots = batch.slots(b, 0, p).to(device)
        k_cache.view(-1, hk, d)[slots] = cached(full_k[b][:p]).to(device).to(cfg.cache_dtype)
        v_cache.view(-1, hk, d)[slots] = cached(full_v[b][:p]).to(device).to(cfg.cache_dtype)
    new_k = torch.cat([full_k[b][p:] for b, (p, _) in enumerate(seqs)]).to(device)
    new_v = torch.cat([full_v[b][p:] for b, (p, _) in enumerate(seqs)]).to(device)
    q = torch.randn(meta.num_tokens, hq, d, generator=gen).to(device) / spread
    layer = AttentionLayer(0, d ** -0.5, window, cap)

    backend.prepare(meta)
    out = backend.forward(q, new_k, new_v, k_cache, v_cache, layer, meta)

    # KV write: exactly the new slots changed, to the new values
    written = torch.zeros(k_cache.view(-1, hk, d).shape[0], dtype=torch.bool)
    written[meta.out_cache_loc.cpu()] = True
    for b, (p, _) in enumerate(seqs):
        written[batch.slots(b, 0, p)] = True
    loc = meta.out_cache_loc.cpu()
    assert torch.equal(k_cache.view(-1, hk, d).cpu()[loc].float(), cached(new_k.cpu()))
    assert torch.equal(v_cache.view(-1, hk, d).cpu()[loc].float(), cached(new_v.cpu()))
    assert bool((k_cache.view(-1, hk, d).cpu()[~written].float() == sentinel).all())

    start = 0
    for b, (p, n) in enumerate(seqs):
        ref = attention_ref(q[start:start + n], cached(full_k[b]), cached(full_v[b]),
                            torch.arange(p, p + n),
                            layer.scale, window, cap)
        err = rel_err(out[start:start + n], ref)
        assert err < 2e-5, f"sequence {b} ({p}+{n}): rel err {err:.3g}"
        start += n


@pytest.mark.parametrize("seqs,hq,hk,d,page,window,cap", [
    (((0, 5), (3, 17), (20, 1)), 4, 2, 64, 4, None, None),
    (((7, 9), (0, 40)), 2, 1, 128, 16, None, None),
    (((11, 20),), 3, 3, 96, 8, 6, None),
    (((2, 19), (30, 3)), 2, 1, 32, 5, None, 5.0),
])
def test_extend(device: torch.device, seqs: tuple[tuple[int, int], ...], hq: int, hk: int,
                d: int, page: int, window: int | None, cap: float | None) -> None:
    _run(device, ForwardMode.EXTEND, seqs, hq, hk, d, page, window, cap, seed=len(seqs) + d)


@pytest.mark.parametrize("seqs,hq,hk,d,page,window,cap,ctx", [
    (((0, 1), (9, 1), (70, 1)), 4, 2, 64, 4, None, None, 8192),
    (((100, 1), (3, 1)), 8, 1, 128, 16, None, None, 512),
    (((50, 1), (12, 1)), 2, 2, 96, 8, 17, None, 8192),
    (((40, 1),), 2, 1, 32, 5, 300, 2.0, 1024),
])
def test_decode(device: torch.device, seqs: tuple[tuple[int, int], ...], hq: int, hk: int,
                d: int, page: int, window: int | None, cap: float | None, ctx: int) -> None:
    _run(device, ForwardMode.DECODE, seqs, hq, hk, d, page, window, cap, seed=7 + d,
         max_context_len=ctx)


@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_fp8_kv_cache(device: torch.device, mode: ForwardMode) -> None:
    """An fp8_e4m3 cache: writes round and saturate (values beyond 448), reads convert back
    unscaled; attention equals the float64 reference over the rounded K/V."""
    seqs = ((6, 9), (20, 3)) if mode is ForwardMode.EXTEND else ((30, 1), (7, 1))
    _run(device, mode, seqs, 4, 2, 64, 8, None, None, seed=11,
         cache_dtype=torch.float8_e4m3fn)


def test_decode_splits_agree(device: torch.device) -> None:
    """The split count changes the work split, not the answer."""
    from heteroserve.platforms.triton.attention_decode import decode_attention

    gen = torch.Generator().manual_seed(3)
    seqs = ((90, 1), (5, 1))
    batch = build_batch(seqs, 8, ForwardMode.DECODE, device, gen)
    k_cache = torch.randn(batch.num_pages, 8, 1, 64, generator=gen).to(device)
    v_cache = torch.randn(batch.num_pages, 8, 1, 64, generator=gen).to(device)
    q = torch.randn(2, 2, 64, generator=gen).to(device)
    layer = AttentionLayer(0, 0.125)
    outs = [decode_attention(q, k_cache, v_cache, torch.empty_like(q), layer, batch.meta, 1, s,
                             block_n=16) for s in (1, 3, 8)]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-5


def test_bad_shapes_raise(device: torch.device) -> None:
    from heteroserve.platforms.triton.attention import TritonAttention

    with pytest.raises(ValueError, match="multiple"):
        TritonAttention(AttentionConfig(3, 2, 64, 16, torch.float32, device))
    with pytest.raises(ValueError, match="head size"):
        TritonAttention(AttentionConfig(2, 2, 512, 16, torch.float32, device))
