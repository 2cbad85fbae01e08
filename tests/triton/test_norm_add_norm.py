"""Triton RMSNorm / residual add / RMSNorm (``norm_add_norm``) against float64 references on
the conformance grid, bitwise against the Triton ``rms_norm`` then ``fused_add_rms_norm`` pair
it replaces, its in-place and error contract, its registration (interpreted on CPU, compiled
on a GPU), its Hopper PTX (no extra FMA contraction against the pair), and in a tiny Gemma 3
against transformers (interpreted only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_harness import PagedSequence, cpu_args, extend
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.dispatch import resolve_all
from heteroserve.core.kernels.registry import KernelRequest
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from ptx_check import hopper_ptx
from triton_refs import rel_err

HAS_GPU = torch.cuda.is_available()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
            amplitude: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + hidden)
    x = torch.randn(rows, hidden, generator=g) * amplitude
    r = torch.randn(rows, hidden, generator=g) * amplitude
    w = torch.randn(hidden, generator=g) * 0.2 + 1.0
    w2 = torch.randn(hidden, generator=g) * 0.2 + 1.0
    return tuple(t.to(dtype).to(device) for t in (x, r, w, w2))


def _conformance_cases() -> list:
    from heteroserve.conformance.cases.elementwise import norm_add_norm_cases

    return norm_add_norm_cases(SimpleNamespace(quick=False))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", _conformance_cases(), ids=lambda c: c.name)
def test_conformance_grid_every_dtype(device: torch.device, case) -> None:
    """The conformance grid, oracle and bounds, bf16 and fp16 included (no ``tl.dot``, so
    the interpreter rounds as the GPU does)."""
    from heteroserve.conformance.oracles.norm import norm_add_norm as oracle
    from heteroserve.conformance.tolerances import tolerance
    from heteroserve.platforms.triton.norm import norm_add_norm

    x, r, w, w2 = _inputs(case.tokens, case.hidden, case.dtype, device, case.amplitude)
    ref_out, ref_res = oracle(x, r, w, w2, case.eps, case.dtype)
    out, res = norm_add_norm(x.clone(), r.clone(), w, w2, case.eps)
    assert out.dtype == res.dtype == case.dtype and out.shape == x.shape
    bound = tolerance(case.dtype).max_rel_err
    assert rel_err(res, ref_res) <= bound and rel_err(out, ref_out) <= bound


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows,hidden,amplitude", [(1, 3840, 1.0), (3, 7, 1.0), (5, 100, 256.0)])
def test_bitwise_equal_to_the_two_launches(device: torch.device, dtype: torch.dtype, rows: int,
                                           hidden: int, amplitude: float) -> None:
    """The fused op rounds where ``rms_norm`` then ``fused_add_rms_norm`` round, so a model's
    greedy tokens cannot change: both outputs are bitwise those of the pair."""
    from heteroserve.platforms.triton.norm import fused_add_rms_norm, norm_add_norm, rms_norm

    x, r, w, w2 = _inputs(rows, hidden, dtype, device, amplitude, seed=7)
    want_out, want_res = fused_add_rms_norm(rms_norm(x, w, 1e-6), r.clone(), w2, 1e-6)
    out, res = norm_add_norm(x.clone(), r.clone(), w, w2, 1e-6)
    assert torch.equal(res, want_res) and torch.equal(out, want_out)


def test_in_place_and_strided_inputs(device: torch.device) -> None:
    """Contiguous inputs: ``r`` is written into ``residual`` and the output into ``x``, which
    are the returned tensors. Row-strided ones work on copies and leave the views alone."""
    from heteroserve.platforms.triton.norm import fused_add_rms_norm, norm_add_norm, rms_norm

    x, r, w, w2 = _inputs(4, 96, torch.float32, device)
    want_out, want_res = fused_add_rms_norm(rms_norm(x, w, 1e-6), r.clone(), w2, 1e-6)
    xc, rc = x.clone(), r.clone()
    out, res = norm_add_norm(xc, rc, w, w2, 1e-6)
    assert out.data_ptr() == xc.data_ptr() and res.data_ptr() == rc.data_ptr()
    assert torch.equal(out, want_out) and torch.equal(res, want_res)
    wide_x = torch.cat([x, x[:, :8]], dim=1)
    wide_r = torch.cat([r, r[:, :8]], dim=1)
    xs, rs = wide_x[:, :96], wide_r[:, :96]
    out, res = norm_add_norm(xs, rs, w, w2, 1e-6)
    assert torch.equal(out, want_out) and torch.equal(res, want_res)
    assert torch.equal(wide_x[:, :96], x) and torch.equal(wide_r[:, :96], r)


def test_empty_batch_and_bad_inputs(device: torch.device) -> None:
    from heteroserve.platforms.triton.norm import MAX_HIDDEN, norm_add_norm

    x, r, w, w2 = _inputs(0, 64, torch.float32, device)
    out, res = norm_add_norm(x, r, w, w2, 1e-6)
    assert out.shape == res.shape == (0, 64)
    x, r, w, w2 = _inputs(2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="differ"):
        norm_add_norm(x, r[:1], w, w2, 1e-6)
    with pytest.raises(ValueError, match="differ"):
        norm_add_norm(x, r.double(), w, w2, 1e-6)
    with pytest.raises(ValueError, match="hidden size"):
        norm_add_norm(x, r, w, w2[:63], 1e-6)
    with pytest.raises(ValueError, match="hidden size"):
        norm_add_norm(x, r, torch.ones(65, device=device), w2, 1e-6)
    big = torch.zeros(1, MAX_HIDDEN + 1, device=device)
    with pytest.raises(ValueError, match="exceeds"):
        norm_add_norm(big, big.clone(), big[0], big[0], 1e-6)


def test_registered_for_cuda_and_rocm_with_fallback_elsewhere() -> None:
    registry = load_plugins().registry
    for platform in ("cuda", "rocm"):  # torch names a HIP device "cuda" too
        request = KernelRequest(platform, "cuda", torch.bfloat16, 256, 16, 8, 16)
        res = resolve_all(registry, request)[ops.NORM_ADD_NORM]
        assert res.chosen.name == "triton" and res.native, (platform, res.rejected)
    request = KernelRequest("npu", "npu", torch.bfloat16, 256, 16, 8, 16)
    res = resolve_all(registry, request)[ops.NORM_ADD_NORM]  # no vendor kernel
    assert res.chosen.name == "torch_native" and not res.native


@pytest.mark.skipif(HAS_GPU, reason="the tiny model runs on the cpu platform: interpreter only")
@torch.no_grad()
def test_tiny_gemma3_with_the_triton_kernel_matches_transformers(tmp_path) -> None:
    """The kernel in the model's calling pattern (in place on the o_proj and down_proj
    outputs and on the residual stream), two calls a layer."""
    import transformers

    from heteroserve.platforms.triton.norm import norm_add_norm

    path = build_tiny_model(tmp_path / "gemma3", "gemma3", seed=1)
    _, dispatch, runner = build_model_runner(cpu_args(path))
    calls = []
    dispatch.norm_add_norm = lambda *a: calls.append(1) or norm_add_norm(*a)
    prompt = [11, 57, 3, 200, 42, 9, 77]
    ours = extend(runner, [(prompt, 0, PagedSequence(runner, len(prompt)))])[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = hf(torch.tensor([prompt])).logits[0, -1]
    assert len(calls) == 2 * hf.config.num_hidden_layers
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_hopper_ptx_contracts_no_more_than_the_pair() -> None:
    """Compiled for sm_90a (no GPU needed): in every dtype the kernel has exactly the FMAs of
    ``rms_norm`` plus ``fused_add_rms_norm`` (an FMA of the first scale and the add would skip
    the rounding of the normed row), and it waits for the previous kernel (PDL)."""
    ptrs, ints = ["x_ptr", "r_ptr", "w_ptr", "y_ptr"], ["stride_x", "stride_r", "stride_y"]
    scalars = {name: "i32" for name in ints + ["hidden"]} | {"eps": "fp32"}
    jobs = []
    for dt in ("fp32", "bf16", "fp16"):
        pair_sig = {p: f"*{dt}" for p in ptrs} | scalars
        for residual in (False, True):
            jobs.append({"kernel": "_rms_norm_kernel", "signature": {
                **pair_sig, "BLOCK": "constexpr", "HAS_RESIDUAL": "constexpr",
                "USE_PDL": "constexpr"}, "constexprs": {
                "BLOCK": 4096, "HAS_RESIDUAL": residual, "USE_PDL": True}})
        fused_sig = {p: f"*{dt}" for p in ("x_ptr", "r_ptr", "w_ptr", "w_next_ptr", "y_ptr")}
        jobs.append({"kernel": "_norm_add_norm_kernel", "signature": {
            **fused_sig, **scalars, "BLOCK": "constexpr", "USE_PDL": "constexpr"},
            "constexprs": {"BLOCK": 4096, "USE_PDL": True}})
    for job in jobs:
        job.update(module="heteroserve.platforms.triton.norm", num_warps=16,
                   aligned=ptrs + ["w_next_ptr"] + ints)
    results = hopper_ptx(jobs)
    for i in range(0, len(results), 3):
        plain, residual, fused = results[i:i + 3]
        assert fused["griddepcontrol_wait"], jobs[i + 2]["signature"]["x_ptr"]
        pair_fma = plain["f32_ops"]["fma"] + residual["f32_ops"]["fma"]
        assert fused["f32_ops"]["fma"] == pair_fma, (jobs[i + 2]["signature"]["x_ptr"],
                                                     plain, residual, fused)
