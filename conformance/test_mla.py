"""Conformance of every MLA backend: exact latent-cache writes, extend and decode (and a
``forward`` decode, and ``forward_prologue`` where implemented) against the float64 oracle,
over :mod:`heteroserve.conformance.cases.mla`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from heteroserve.conformance.cases.mla import MLACase, mla_cases
from heteroserve.conformance.checks import (
    SENTINEL, assert_bitwise_equal, assert_close, run_op,
)
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles import norm as norm_ref
from heteroserve.conformance.oracles import rotary as rotary_ref
from heteroserve.conformance.oracles.mla import mla as mla_ref
from heteroserve.conformance.paged import PagedBatch, build_batch, new_cache
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.kernels.mla import MLABackend, MLAConfig, MLALayer, MLAPrologue


@dataclass
class MLASetup:
    """A backend, a batch, a latent cache holding the cached prefixes (the rest SENTINEL),
    each sequence's whole ``[latent | k_pe]`` rows on the host, the new tokens' inputs and
    the up-projection weights."""

    backend: MLABackend
    batch: PagedBatch
    cache: torch.Tensor
    rows: list[torch.Tensor]
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    latent_new: torch.Tensor
    k_pe_new: torch.Tensor
    w_kc: torch.Tensor
    w_vc: torch.Tensor
    layer: MLALayer


def _setup(conf: ConfParam, ctx: ConformanceContext) -> MLASetup:
    case: MLACase = conf.case  # type: ignore[assignment]
    c, dn, r, dv = case.dims
    dev, dt = ctx.device, case.dtype
    lens = [p + n for p, n in case.seqs]
    backend = conf.load()(MLAConfig(case.heads, c, dn, r, dv, case.page_size, dt, dev,
                                    max_batch_size=max(8, len(lens)),
                                    max_context_len=max(256, 2 * max(lens))))
    gen = case.generator()
    mode = ForwardMode.DECODE if case.kind == "decode" else ForwardMode.EXTEND
    batch = build_batch(case.seqs, case.page_size, mode, dev, gen)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    rows = [rand(n, c + r) for n in lens]
    cache = new_cache(backend.kv_cache_shape(batch.num_pages), dt, dev)
    flat = cache.view(-1, c + r)
    for b, (p, _) in enumerate(case.seqs):
        flat[batch.slots(b, 0, p).to(dev)] = rows[b][:p].to(dev)
    new = torch.cat([x[p:] for x, (p, _) in zip(rows, case.seqs)]).to(dev)
    t = new.shape[0]
    # weights scaled so up-projected keys and values stay O(1) (scores stay moderate)
    w_kc = rand(case.heads, dn, c, std=c ** -0.5).to(dev)
    w_vc = rand(case.heads, dv, c, std=c ** -0.5).to(dev)
    layer = MLALayer(0, (dn + r) ** -0.5)
    return MLASetup(backend, batch, cache, rows, rand(t, case.heads, dn).to(dev),
                    rand(t, case.heads, r).to(dev), new[:, :c].contiguous(),
                    new[:, c:].contiguous(), w_kc, w_vc, layer)


def _expected_cache(s: MLASetup) -> torch.Tensor:
    width = s.cache.shape[-1]
    want = torch.full((s.cache.numel() // width, width), SENTINEL, dtype=s.cache.dtype)
    for b, x in enumerate(s.rows):
        want[s.batch.slots(b, 0, x.shape[0])] = x
    return want


def _check_cache(s: MLASetup, what: str) -> None:
    got = s.cache.reshape(-1, s.cache.shape[-1]).cpu()
    assert_bitwise_equal(got, _expected_cache(s),
                         f"{what}: latent cache (only the new tokens' slots may change)")


def _reference(s: MLASetup, case: MLACase) -> torch.Tensor:
    c = case.dims[0]
    return mla_ref(s.q_nope, s.q_pe, [x[:, :c] for x in s.rows], [x[:, c:] for x in s.rows],
                   s.w_kc, s.w_vc, [n for _, n in case.seqs], s.layer.scale)


@conformance(mla_cases("write_kv"))
def test_mla_write_kv(conf: ConfParam, ctx: ConformanceContext) -> None:
    s = _setup(conf, ctx)
    s.backend.prepare(s.batch.meta)
    s.backend.write_kv(s.latent_new, s.k_pe_new, s.cache, s.batch.meta)
    _check_cache(s, "write_kv")


def _attend(conf: ConfParam, ctx: ConformanceContext, request: pytest.FixtureRequest) -> None:
    s = _setup(conf, ctx)
    case: MLACase = conf.case  # type: ignore[assignment]
    s.backend.prepare(s.batch.meta)
    s.backend.write_kv(s.latent_new, s.k_pe_new, s.cache, s.batch.meta)
    _check_cache(s, "write_kv")
    before = (s.cache.clone(), s.q_nope.clone(), s.q_pe.clone())
    fn = s.backend.decode if case.kind == "decode" else s.backend.extend
    out = run_op(lambda: fn(s.q_nope, s.q_pe, s.cache, s.w_kc, s.w_vc, s.layer,
                            s.batch.meta), tuple)
    assert_bitwise_equal((s.cache, s.q_nope, s.q_pe), before,
                         f"{case.kind} must not modify q or the cache")
    assert_close(out, _reference(s, case), case.dtype, f"mla {case.kind} output", request)


@conformance(mla_cases("extend"))
def test_mla_extend(conf: ConfParam, ctx: ConformanceContext,
                    request: pytest.FixtureRequest) -> None:
    _attend(conf, ctx, request)


@conformance(mla_cases("decode"))
def test_mla_decode(conf: ConfParam, ctx: ConformanceContext,
                    request: pytest.FixtureRequest) -> None:
    _attend(conf, ctx, request)


@conformance(mla_cases("decode"))
def test_mla_forward_decode(conf: ConfParam, ctx: ConformanceContext,
                            request: pytest.FixtureRequest) -> None:
    """``forward`` (which may fuse the latent store into the kernel) leaves the cache exactly
    as ``write_kv`` does and attends like ``write_kv`` + ``decode``."""
    s = _setup(conf, ctx)
    case: MLACase = conf.case  # type: ignore[assignment]
    s.backend.prepare(s.batch.meta)
    out = run_op(lambda: s.backend.forward(s.q_nope, s.q_pe, s.latent_new, s.k_pe_new, s.cache,
                                           s.w_kc, s.w_vc, s.layer, s.batch.meta), tuple)
    _check_cache(s, "forward")
    assert_close(out, _reference(s, case), case.dtype, "mla forward (decode) output", request)


@conformance(mla_cases("decode"))
def test_mla_forward_prologue_decode(conf: ConfParam, ctx: ConformanceContext,
                                     request: pytest.FixtureRequest) -> None:
    """``forward_prologue`` (optional: skipped where it returns None) of un-normed latents and
    un-rotated ``q_pe`` / ``k_pe``, passed as strided views of one projection output as the
    DeepSeek layer passes them, in both rotary styles: the new cache rows are the float64 norm
    and rotation rounded once to the dtype, every other slot is untouched, the output is the
    oracle's over the rotated query, and the inputs are left as they were."""
    s = _setup(conf, ctx)
    case: MLACase = conf.case  # type: ignore[assignment]
    c, dn, r, _ = case.dims
    dev, dt = ctx.device, case.dtype
    gen = case.generator(7)
    q = torch.cat([s.q_nope, s.q_pe], dim=-1)  # [T, H, dn + r]: q_nope and q_pe are views
    kv_a = torch.cat([s.latent_new * 3.0, s.k_pe_new], dim=-1)  # un-normed, O(3) latents
    q_nope, q_pe = q.split([dn, r], dim=-1)
    latent, k_pe = kv_a.split([c, r], dim=-1)
    norm_weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dt).to(dev)
    positions = torch.tensor([p for p, _ in case.seqs], dtype=torch.int64, device=dev)
    table = rotary_ref.cos_sin_cache(max(p for p, _ in case.seqs) + 2, r).float().to(dev)
    eps = 1e-6
    new_slots = torch.cat([s.batch.slots(b, p, p + n) for b, (p, n) in enumerate(case.seqs)])
    for is_neox in (False, True):
        s.cache.copy_(new_cache(s.cache.shape, dt, dev))
        flat = s.cache.view(-1, c + r)
        for b, (p, _) in enumerate(case.seqs):
            flat[s.batch.slots(b, 0, p).to(dev)] = s.rows[b][:p].to(dev)
        prologue = MLAPrologue(norm_weight, eps, positions, table, is_neox)
        before = (q.clone(), kv_a.clone())
        s.backend.prepare(s.batch.meta)
        out = s.backend.forward_prologue(q_nope, q_pe, latent, k_pe, prologue, s.cache,
                                         s.w_kc, s.w_vc, s.layer, s.batch.meta)
        if out is None:
            pytest.skip("forward_prologue returns None (optional): the layer runs the norm "
                        "and rotary ops before forward")
        assert_bitwise_equal((q, kv_a), before, "forward_prologue must not modify its inputs")
        normed = norm_ref.rms_norm(latent, norm_weight, eps)
        k_rot = rotary_ref.rotate(positions, k_pe[:, None], table, is_neox)[:, 0]
        q_rot = rotary_ref.rotate(positions, q_pe, table, is_neox)
        want_rows = torch.cat([normed, k_rot], dim=-1)
        got = s.cache.reshape(-1, c + r).cpu()
        assert_close(got[new_slots], want_rows, dt, f"new latent rows (is_neox={is_neox})",
                     request)
        rows = [x.clone() for x in s.rows]
        row = 0
        for b, (p, n) in enumerate(case.seqs):
            rows[b][p:p + n] = got[new_slots[row:row + n]]
            row += n
        s.rows = rows
        _check_cache(s, f"forward_prologue (is_neox={is_neox})")
        ref = mla_ref(s.q_nope, q_rot, [x[:, :c] for x in rows], [x[:, c:] for x in rows],
                      s.w_kc, s.w_vc, [n for _, n in case.seqs], s.layer.scale)
        assert_close(out, ref, dt, f"mla forward_prologue output (is_neox={is_neox})", request)
