"""``TritonAttention.forward_prologue``: the qk-norm and rotary folded into the decode split
kernel, against the separate Triton ops followed by ``forward`` (interpreted on CPU, compiled
on a GPU)."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.oracles.rotary import cos_sin_cache
from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import (
    AttentionConfig, AttentionLayer, AttentionPrologue, ForwardMode,
)

SENTINEL = 1234.5


def _setup(device: torch.device, hq: int, hk: int, d: int, lens: tuple[int, ...],
           max_context: int, seed: int):
    from heteroserve.platforms.triton.attention import TritonAttention

    seqs = tuple((n - 1, 1) for n in lens)
    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(seqs, 16, ForwardMode.DECODE, device, gen)
    backend = TritonAttention(AttentionConfig(hq, hk, d, 16, torch.float32, device,
                                              max_context_len=max_context))
    caches = []
    for _ in range(2):  # two copies of the same K and V caches with the cached prefixes
        k_cache = torch.full(backend.kv_cache_shape(batch.num_pages), SENTINEL, device=device)
        v_cache = torch.full_like(k_cache, SENTINEL)
        caches.append((k_cache, v_cache))
    g2 = torch.Generator().manual_seed(seed + 1)
    for b, (p, _) in enumerate(seqs):
        slots = batch.slots(b, 0, p).to(device)
        k_rows, v_rows = torch.randn(2, p, hk, d, generator=g2).to(device)
        for k_cache, v_cache in caches:
            k_cache.view(-1, hk, d)[slots] = k_rows
            v_cache.view(-1, hk, d)[slots] = v_rows
    qkv = (torch.randn(len(lens), (hq + 2 * hk) * d, generator=gen) * 2.0).to(device)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    views = (q.view(-1, hq, d), k.view(-1, hk, d), v.view(-1, hk, d))
    positions = torch.tensor([p for p, _ in seqs], device=device)
    return backend, batch, caches, qkv, views, positions, gen


@pytest.mark.parametrize("norm", [True, False], ids=["qk_norm", "rotary_only"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("hq,hk,d,rot,lens,max_context", [
    (8, 2, 64, 64, (1, 17, 40), 4096),     # several splits, one a one-key sequence
    (6, 3, 48, 32, (5, 33), 64),           # partial rotary, padded head, one split
])
def test_forward_prologue_equals_the_separate_ops(device, norm, is_neox, hq, hk, d, rot,
                                                  lens, max_context) -> None:
    """Same K/V cache contents and output (fp32) as ``qk_norm_rotary`` (or ``apply_rotary``)
    then ``forward``, with q/k/v strided views of one qkv row and the inputs untouched."""
    from heteroserve.platforms.triton.qk_norm import qk_norm_rotary
    from heteroserve.platforms.triton.rotary import apply_rotary

    backend, batch, caches, qkv, (q, k, v), positions, gen = _setup(
        device, hq, hk, d, lens, max_context, seed=hq * 100 + d + rot + int(is_neox))
    table = cos_sin_cache(64, rot).float().to(device)
    weights = [(torch.rand(d, generator=gen) + 0.5).to(device) for _ in range(2)]
    prologue = (AttentionPrologue(positions, table, is_neox, weights[0], weights[1], 1e-6)
                if norm else AttentionPrologue(positions, table, is_neox))
    layer = AttentionLayer(0, d ** -0.5)
    before = qkv.clone()
    backend.prepare(batch.meta)
    fused = backend.forward_prologue(q, k, v, *caches[0], layer, batch.meta, prologue)
    assert fused is not None
    assert torch.equal(qkv, before), "forward_prologue must not modify its inputs"

    q2, k2 = q.clone(), k.clone()
    if norm:
        q2, k2 = qk_norm_rotary(q2, k2, weights[0], weights[1], 1e-6, positions, table, is_neox)
    else:
        q2, k2 = apply_rotary(positions, q2, k2, table, is_neox)
    separate = backend.forward(q2, k2, v, *caches[1], layer, batch.meta)
    for fused_cache, separate_cache in zip(caches[0], caches[1]):
        torch.testing.assert_close(fused_cache.cpu(), separate_cache.cpu(), rtol=1e-6,
                                   atol=1e-6)
    torch.testing.assert_close(fused.cpu(), separate.cpu(), rtol=1e-5, atol=1e-6)


def test_forward_prologue_declines_extends_and_checks_its_inputs(device) -> None:
    """Extend steps return None (the layer runs the ops); a rotary cache wider than the head
    or positions of the wrong length are a ``ValueError``."""
    backend, batch, caches, _, (q, k, v), positions, _ = _setup(device, 4, 2, 32, (3, 9), 256,
                                                                seed=3)
    layer = AttentionLayer(0, 32 ** -0.5)
    good = AttentionPrologue(positions, cos_sin_cache(16, 32).float().to(device), True)
    extend = build_batch(((0, 2), (4, 1)), 16, ForwardMode.EXTEND, device,
                         torch.Generator().manual_seed(0))
    qe, ke, ve = (torch.randn(3, h, 32).to(device) for h in (4, 2, 2))
    assert backend.forward_prologue(qe, ke, ve, *caches[0], layer, extend.meta,
                                    AttentionPrologue(positions[:1].repeat(3), good.cos_sin_cache,
                                                      True)) is None
    wide = AttentionPrologue(positions, cos_sin_cache(16, 64).float().to(device), True)
    with pytest.raises(ValueError, match="rotary cache"):
        backend.forward_prologue(q, k, v, *caches[0], layer, batch.meta, wide)
    short = AttentionPrologue(positions[:1], good.cos_sin_cache, True)
    with pytest.raises(ValueError, match="positions"):
        backend.forward_prologue(q, k, v, *caches[0], layer, batch.meta, short)
    with pytest.raises(ValueError, match="both set"):
        AttentionPrologue(positions, good.cos_sin_cache, True, torch.ones(32))


def test_split_kernel_with_prologue_compiles_for_hopper() -> None:
    """The decode split kernel with the prologue folded in (rotary, qk-norm + rotary), at
    Qwen3-30B-A3B's bf16 shape (8 query heads a KV head, head size 128), builds for sm_90a,
    keeps its PDL wait and spills no more than the kernel without it (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from ptx_check import hopper_ptx

    ptrs = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "k_new_ptr": "*bf16",
            "v_new_ptr": "*bf16", "loc_ptr": "*i64", "seq_lens_ptr": "*i32",
            "kv_indptr_ptr": "*i32", "kv_indices_ptr": "*i32", "sm_scale": "fp32",
            "logit_cap": "fp32", "window": "i32"}
    strides = ["stride_qt", "stride_qh", "stride_cs", "stride_ch", "stride_mb", "stride_mh",
               "stride_ms", "stride_lb", "stride_lh", "stride_knt", "stride_knh", "stride_vnt",
               "stride_vnh"]
    prologue = {"pos_ptr": "*i64", "rope_ptr": "*fp32", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
                "eps": "fp32", "stride_rope": "i32"}
    jobs = []
    for folded, qk_norm in ((False, False), (True, False), (True, True)):
        consts = {"GROUP": 8, "HEAD_DIM": 128, "PAGE_SIZE": 1, "NUM_SPLITS": 64,
                  "BLOCK_G": 16, "BLOCK_D": 128, "BLOCK_N": 64, "HAS_CAP": False,
                  "HAS_WINDOW": False, "EXACT_FP32": False, "WRITE_KV": True,
                  "CACHE_MAX": 0.0, "PROLOGUE": folded, "QK_NORM": qk_norm, "ROPE_HALF": 64,
                  "IS_NEOX": True, "USE_PDL": True}
        sig = {**ptrs, **dict.fromkeys(strides, "i32"), **prologue,
               **dict.fromkeys(consts, "constexpr")}
        jobs.append({"kernel": "_decode_split_kernel",
                     "module": "heteroserve.platforms.triton.attention_decode",
                     "signature": sig, "num_warps": 4, "num_stages": 2, "aligned": [],
                     "constexprs": consts, "resources": True})
    plain, rotary, norm_rotary = hopper_ptx(jobs)
    for name, result in (("rotary", rotary), ("qk-norm + rotary", norm_rotary)):
        assert result["griddepcontrol_wait"], f"{name}: the kernel waits for the projection"
        assert result["stack"] <= plain["stack"], \
            f"{name}: {result['stack']} bytes of stack a thread against {plain['stack']}"
