"""apply_rotary against a float64 reference; the cos/sin cache against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from heteroserve.core.layers.rotary_cache import build_cos_sin_cache
from heteroserve.platforms.cpu.rotary import apply_rotary


def _reference(positions: torch.Tensor, x: torch.Tensor, cache: torch.Tensor,
               is_neox: bool) -> torch.Tensor:
    """Rotate pairs explicitly in float64 with the cache's cos/sin values."""
    out = x.double().clone()
    half = cache.shape[1] // 2
    for t, pos in enumerate(positions.tolist()):
        for i in range(half):
            cos, sin = cache[pos, i].item(), cache[pos, half + i].item()
            a, b = (i, i + half) if is_neox else (2 * i, 2 * i + 1)
            xa, xb = x[t, :, a].double(), x[t, :, b].double()
            out[t, :, a] = xa * cos - xb * sin
            out[t, :, b] = xb * cos + xa * sin
    return out


def test_default_cache_is_accurate() -> None:
    """The fp32 cache is within fp32 angle rounding of the exact float64 values."""
    cache = build_cos_sin_cache(32, 512, 10000.0)
    pos = torch.arange(512, dtype=torch.float64)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(cache.double(), torch.cat([angle.cos(), angle.sin()], 1),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head,rot_dim", [(64, 64), (64, 32), (80, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary(is_neox: bool, head: int, rot_dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    positions = torch.tensor([0, 1, 7, 100, 4095, 3])
    q = torch.randn(6, 4, head, generator=gen).to(dtype)
    k = torch.randn(6, 2, head, generator=gen).to(dtype)
    q0, k0 = q.clone(), k.clone()
    cache = build_cos_sin_cache(rot_dim, 4096, 10000.0)
    q_out, k_out = apply_rotary(positions, q, k, cache, is_neox)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert q_out.dtype == dtype and k_out.shape == k.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, x in ((q_out, q), (k_out, k)):
        ref = _reference(positions, x, cache, is_neox)
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)
        assert torch.equal(got[..., rot_dim:], x[..., rot_dim:])


def test_rotary_bad_shapes() -> None:
    cache = build_cos_sin_cache(64, 16, 10000.0)
    with pytest.raises(ValueError, match="head size"):
        apply_rotary(torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 32),
                     torch.zeros(2, 1, 32), cache, True)
    with pytest.raises(ValueError, match="token count"):
        apply_rotary(torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, 64),
                     torch.zeros(2, 1, 64), cache, True)


def _hf_cos_sin(rope_parameters: dict, head_dim: int,
                max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters))
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(max_pos)[None])
    return cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]


@pytest.mark.parametrize("params,max_pos", [
    ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 16384),
    ({"rope_type": "default", "rope_theta": 1000000.0}, 2048),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5}, 2048),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
      "original_max_position_embeddings": 1024}, 4096),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
      "original_max_position_embeddings": 256}, 1024),
])
def test_cos_sin_cache_matches_transformers(params: dict, max_pos: int) -> None:
    cache = build_cos_sin_cache(128, max_pos, params["rope_theta"], params)
    cos, sin = _hf_cos_sin(params, 128, max_pos)
    assert cache.shape == (max_pos, 128) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[:, :64], cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, 64:], sin, atol=1e-6, rtol=0)


def test_llama3_scaling_changes_low_frequencies_only() -> None:
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    plain = build_cos_sin_cache(64, 200, 10000.0)
    scaled = build_cos_sin_cache(64, 200, 10000.0, params)
    assert torch.equal(plain[:, :2], scaled[:, :2])  # highest frequencies untouched
    assert not torch.allclose(plain[:, 31], scaled[:, 31])


@pytest.mark.parametrize("kwargs,match", [
    ({"rotary_dim": 63}, "even"),
    ({"rope_scaling": {"rope_type": "su"}}, "unsupported rope type"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"max_position": 0}, "max_position"),
])
def test_cos_sin_cache_errors(kwargs: dict, match: str) -> None:
    args = {"rotary_dim": 64, "max_position": 16, "base": 10000.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_cos_sin_cache(**args)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views_rotate_in_one_pass(tokens: int, dtype: torch.dtype) -> None:
    """q and k split from one qkv row (k's heads right after q's) take the one-pass path: the
    results equal rotating contiguous copies, the qkv buffer is untouched, and the outputs are
    head slices of one new tensor."""
    from heteroserve.platforms.cpu.rotary import _adjacent_heads

    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (6 + 2 + 2) * 32, generator=gen).to(dtype)
    q = qkv[:, :6 * 32].reshape(tokens, 6, 32)
    k = qkv[:, 6 * 32:8 * 32].reshape(tokens, 2, 32)
    assert _adjacent_heads(q, k) and not _adjacent_heads(k, q)
    qkv0 = qkv.clone()
    positions = torch.arange(tokens) * 3 + 1
    cache = build_cos_sin_cache(32, 64, 10000.0)
    q_out, k_out = apply_rotary(positions, q, k, cache, True)
    q_ref, k_ref = apply_rotary(positions, q.contiguous().clone(), k.contiguous().clone(),
                                cache, True)
    assert torch.equal(qkv, qkv0)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert q_out.data_ptr() != q.data_ptr() and q_out.stride()[1:] == (32, 1)


def test_cos_sin_memo_follows_positions_in_place() -> None:
    """The per-forward cos/sin memo is keyed on the positions object and its values: a
    positions buffer updated in place must not get the previous step's angles."""
    cache = build_cos_sin_cache(16, 64, 10000.0)
    positions = torch.tensor([1, 2])
    q, k = torch.randn(2, 2, 16), torch.randn(2, 1, 16)
    first = apply_rotary(positions, q, k, cache, True)
    again = apply_rotary(positions, q, k, cache, True)
    assert torch.equal(first[0], again[0])
    positions.copy_(torch.tensor([30, 40]))
    moved = apply_rotary(positions, q, k, cache, True)
    fresh = apply_rotary(positions.clone(), q, k, cache, True)
    assert torch.equal(moved[0], fresh[0]) and not torch.equal(moved[0], first[0])
    ref = _reference(positions, q, cache, True)
    torch.testing.assert_close(moved[0].double(), ref, atol=1e-5, rtol=1e-5)


def test_layers_share_one_cos_sin_cache() -> None:
    """Every rotary layer with the same parameters holds the same cache tensor (one Llama-3.1
    layer's cache is 64 MiB); different parameters get their own."""
    from heteroserve.core.layers.rotary import shared_cos_sin_cache

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    a = shared_cos_sin_cache(16, 256, 500000.0, scaling, torch.device("cpu"))
    b = shared_cos_sin_cache(16, 256, 500000.0, dict(reversed(scaling.items())), "cpu")
    assert a is b
    assert torch.equal(a, build_cos_sin_cache(16, 256, 500000.0, scaling))
    assert shared_cos_sin_cache(16, 256, 10000.0, scaling, "cpu") is not a
    assert shared_cos_sin_cache(16, 256, 500000.0, None, "cpu") is not a


def test_adjacent_but_separate_allocations_rotate_separately() -> None:
    """q and k in two storages that happen to lie back to back (as a caching allocator
    hands out) are not one fused output: each is rotated on its own (a joint view of q's
    storage would run past its end)."""
    import numpy as np

    from heteroserve.platforms.cpu.rotary import _adjacent_heads

    block = np.random.default_rng(0).standard_normal(9 * 64).astype(np.float32)
    q = torch.from_numpy(block[:8 * 64]).view(1, 8, 64)
    k = torch.from_numpy(block[8 * 64:]).view(1, 1, 64)
    assert k.data_ptr() == q.data_ptr() + q.numel() * 4
    assert not _adjacent_heads(q, k)
    cache = build_cos_sin_cache(64, 16, 10000.0)
    q_out, k_out = apply_rotary(torch.tensor([5]), q, k, cache, True)
    torch.testing.assert_close(q_out.double(), _reference(torch.tensor([5]), q, cache, True))
    torch.testing.assert_close(k_out.double(), _reference(torch.tensor([5]), k, cache, True))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head,rot_dim", [(64, 64), (80, 40)])
def test_traced_form_equals_the_eager_rotation(is_neox: bool, head: int, rot_dim: int) -> None:
    """The functional form a torch.compile trace takes (no memo, no views written through)
    rotates like the eager path: against the float64 reference, pass-through dims intact."""
    gen = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 5, 4095])
    q = torch.randn(3, 4, head, generator=gen)
    k = torch.randn(3, 2, head, generator=gen)
    cache = build_cos_sin_cache(rot_dim, 4096, 10000.0)
    traced = torch.compile(apply_rotary, backend="eager", fullgraph=True)
    q_out, k_out = traced(positions, q, k, cache, is_neox)
    eager_q, eager_k = apply_rotary(positions, q, k, cache, is_neox)
    for got, eager, x in ((q_out, eager_q, q), (k_out, eager_k, k)):
        torch.testing.assert_close(got.double(), _reference(positions, x, cache, is_neox),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
        assert torch.equal(got[..., rot_dim:], x[..., rot_dim:])
