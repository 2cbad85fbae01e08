"""cuda's ``FlashInferFp8BlockLinear`` on the host, with the flashinfer GEMM double: products of
``MIN_ROWS``+ bf16 rows go to ``flashinfer.gemm.fp8_blockscale_gemm_sm90`` with the layer's
own tensors and match the float64 product of the dequantized weight and the per-group
quantized activations; fewer rows, fp16 rows, shapes the kernel refuses and a failed probe
take the Triton method's path; the registry offers it as ``linear.fp8_block=flashinfer``."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.checks import rel_err
from heteroserve.conformance.oracles.linear import dequantize, quantize_activations
from heteroserve.core.kernels.linear import FP8_BLOCK

MIN_ROWS = 16  # what 64 is on a GPU, at test sizes


def _layer(n: int, k: int, gen: torch.Generator) -> torch.nn.Module:
    layer = torch.nn.Module()
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // FP8_BLOCK), k // FP8_BLOCK, generator=gen) + 0.5
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
    return layer


def _oracle(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """float64: ``x`` quantized per row and 128 columns to e4m3, times the dequantized W
    (the conformance suite's oracle)."""
    w = dequantize("fp8_block", {"weight": layer.weight.data,
                                 "weight_scale_inv": layer.weight_scale_inv.data}, FP8_BLOCK)
    return quantize_activations("fp8_block", x, torch.float8_e4m3fn) @ w.t()


def _interpreter_safe_quantize_rows(real):
    """``quantize_rows`` whose kernel writes fp32 and torch rounds to e4m3: the Triton
    interpreter's fp8 cast is wrong (127.0 -> 64.0), a GPU's is not; scaling, clamping,
    gating and the scales' layout stay the kernel's."""
    def quantize_rows(x, out_dtype, *args, **kwargs):
        q, s = real(x, torch.float32, *args, **kwargs)
        return q.to(out_dtype), s
    return quantize_rows


@pytest.fixture
def method(flashinfer_double, monkeypatch):
    from heteroserve.platforms.cuda import flashinfer_fp8_block as mod

    monkeypatch.setattr(mod, "MIN_ROWS", MIN_ROWS)
    monkeypatch.setattr(mod, "_READY", {})
    monkeypatch.setattr(mod, "_PREQUANTIZED", {})
    monkeypatch.setattr(mod, "FUSED_SILU_AND_MUL", True)
    monkeypatch.setattr(mod, "quantize_rows", _interpreter_safe_quantize_rows(mod.quantize_rows))
    return mod


def _spy(monkeypatch, mod) -> list[tuple]:
    calls: list[tuple] = []
    real = mod.load_gemm()

    def gemm(*args, **kwargs):
        calls.append(tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args))
        return real(*args, **kwargs)
    monkeypatch.setattr(mod, "load_gemm", lambda: gemm)
    return calls


@pytest.mark.parametrize("n,k,lead", [(256, 256, (24,)), (320, 384, (3, 7))],
                         ids=["N256", "N320-ragged-block-3d"])
def test_large_products_go_to_flashinfer(method, monkeypatch, n, k, lead) -> None:
    gen = torch.Generator().manual_seed(n + k)
    layer = _layer(n, k, gen)
    linear = method.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    calls = _spy(monkeypatch, method)
    x = torch.randn(*lead, k, generator=gen).to(torch.bfloat16)
    x_before = x.clone()
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    y = linear.apply(layer, x, bias)
    assert calls == [((int(torch.tensor(lead).prod()), k), (n, k), None, tuple(
        layer.weight_scale_inv.shape))]
    assert y.shape == (*lead, n) and y.dtype == torch.bfloat16
    assert torch.equal(x, x_before)
    ref = _oracle(x.reshape(-1, k), layer) + bias.double()
    assert rel_err(y.reshape(-1, n), ref) < 1e-2


def test_a_strided_input_is_made_contiguous(method, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    layer = _layer(256, 256, gen)
    linear = method.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    wide = torch.randn(MIN_ROWS, 512, generator=gen).to(torch.bfloat16)
    y = linear.apply(layer, wide[:, 128:384])
    assert rel_err(y, _oracle(wide[:, 128:384].contiguous(), layer)) < 1e-2


@pytest.mark.parametrize("case", ["few_rows", "fp16", "n_not_64", "probe_failed"])
def test_other_inputs_take_the_triton_path(method, monkeypatch, case) -> None:
    from heteroserve.platforms.triton.linear_w8a8 import Fp8BlockLinear

    gen = torch.Generator().manual_seed(2)
    n = 160 if case == "n_not_64" else 128
    layer = _layer(n, 256, gen)
    linear = method.FlashInferFp8BlockLinear()
    if case == "probe_failed":
        monkeypatch.setattr(method, "_probe", lambda device: ("RuntimeError: no sm90", False))
    linear.process_weights_after_loading(layer)
    rows = 5 if case == "few_rows" else MIN_ROWS
    dtype = torch.float16 if case == "fp16" else torch.bfloat16
    x = torch.randn(rows, 256, generator=gen).to(dtype)
    expected = Fp8BlockLinear().apply(layer, x)
    calls = _spy(monkeypatch, method)
    parent: list[int] = []
    real_apply = Fp8BlockLinear.apply

    def apply(self, layer, x, bias=None):
        parent.append(x.shape[0])
        return real_apply(self, layer, x, bias)
    monkeypatch.setattr(Fp8BlockLinear, "apply", apply)
    y = linear.apply(layer, x)
    assert calls == [] and parent == [rows]
    assert torch.equal(y, expected)


def _silu_and_mul_oracle(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """:func:`_oracle` (host ``layer``) of the SiLU-and-mul op's output for ``x`` on its own
    device (the op's rounding to bf16 is the pair's contract; the Triton interpreter's
    rounding differs from a GPU's)."""
    from heteroserve.platforms.triton.activation import silu_and_mul

    return _oracle(silu_and_mul(x).cpu(), layer)


@pytest.mark.parametrize("rows", [MIN_ROWS, MIN_ROWS + 2], ids=["M16", "M18-padded-scales"])
def test_the_silu_and_mul_hands_the_runner_its_fp8_input(method, monkeypatch, rows) -> None:
    """The down projection's SiLU-and-mul writes the runner's e4m3 input and group-major
    scales (``M`` padded to 4) in one kernel; the product matches the float64 oracle of the
    unfused pair."""
    gen = torch.Generator().manual_seed(rows)
    layer = _layer(256, 384, gen)
    linear = method.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    assert method.takes_prequantized(torch.device("cpu"))
    calls = _spy(monkeypatch, method)
    x = torch.randn(rows, 768, generator=gen).to(torch.bfloat16) * 3
    x_before = x.clone()
    y = linear.apply_silu_and_mul(layer, x)
    pad = -(-rows // 4) * 4
    assert calls == [((rows, 384), (256, 384), (3, pad), (2, 3))]
    assert torch.equal(x, x_before) and y.shape == (rows, 256) and y.dtype == torch.bfloat16
    assert rel_err(y, _silu_and_mul_oracle(x, layer)) < 1e-2


def test_the_silu_and_mul_leaves_other_inputs_to_the_caller(method, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(4)
    layer = _layer(256, 256, gen)
    linear = method.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    calls = _spy(monkeypatch, method)
    few = torch.randn(MIN_ROWS - 1, 512, generator=gen).to(torch.bfloat16)
    assert linear.apply_silu_and_mul(layer, few) is None
    assert linear.apply_silu_and_mul(layer, few.half().repeat(2, 1)) is None
    enough = torch.randn(MIN_ROWS, 512, generator=gen).to(torch.bfloat16)
    monkeypatch.setattr(method, "FUSED_SILU_AND_MUL", False)
    assert linear.apply_silu_and_mul(layer, enough) is None
    assert calls == []
    monkeypatch.setattr(method, "FUSED_SILU_AND_MUL", True)
    assert linear.apply_silu_and_mul(layer, enough) is not None and len(calls) == 1


def test_the_probe_catches_a_scale_layout_the_runner_does_not_read(method, monkeypatch) -> None:
    """Scales handed over row-major (not the runner's layout): the probe's pre-quantized
    product fails, so the SiLU-and-mul stays unfused while the bf16 path serves."""
    real = method.prequantized_input

    def row_major(x2, gated=False):
        q, scales = real(x2, gated)
        return q, scales.t()[: x2.shape[0]].contiguous()
    monkeypatch.setattr(method, "prequantized_input", row_major)
    dev = torch.device("cpu")
    assert method.unavailable(dev) is None and not method.takes_prequantized(dev)
    gen = torch.Generator().manual_seed(5)
    layer = _layer(256, 256, gen)
    linear = method.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    x = torch.randn(MIN_ROWS, 512, generator=gen).to(torch.bfloat16)
    assert linear.apply_silu_and_mul(layer, x) is None


def test_the_probe_reports_why(method, monkeypatch) -> None:
    def broken():
        raise ImportError("flashinfer.gemm has no fp8_blockscale_gemm_sm90")
    monkeypatch.setattr(method, "load_gemm", broken)
    why = method.unavailable(torch.device("cpu"))
    assert why == "ImportError: flashinfer.gemm has no fp8_blockscale_gemm_sm90"
    assert method.unavailable(torch.device("cpu")) == why  # probed once per device


def test_the_double_refuses_what_flashinfer_refuses(flashinfer_double) -> None:
    from flashinfer.gemm import fp8_blockscale_gemm_sm90

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(128, 256, generator=gen).to(torch.float8_e4m3fn)
    s = torch.ones(1, 2)
    with pytest.raises(ValueError, match="N dimension must be divisible by 64"):
        fp8_blockscale_gemm_sm90(x, w[:96], None, s)
    with pytest.raises(ValueError, match="weight_scale shape mismatch"):
        fp8_blockscale_gemm_sm90(x, w, None, torch.ones(2, 2))
    with pytest.raises(ValueError, match="input_scale should not be provided"):
        fp8_blockscale_gemm_sm90(x, w, torch.ones(4, 2), s)
    with pytest.raises(ValueError, match="input_scale is required"):
        fp8_blockscale_gemm_sm90(x.to(torch.float8_e4m3fn), w, None, s)
    with pytest.raises(ValueError, match="fewer than the 8 floats"):  # 2 groups x 4 rows
        fp8_blockscale_gemm_sm90(x.to(torch.float8_e4m3fn), w, torch.ones(4), s)
    with pytest.raises(ValueError, match="stride of K"):
        fp8_blockscale_gemm_sm90(torch.randn(4, 512).to(torch.bfloat16)[:, :256], w, None, s)
    with pytest.raises(ValueError, match="divisible by block size"):
        fp8_blockscale_gemm_sm90(x[:, :192], w[:, :192], None, s)


def test_registered_as_the_flashinfer_fp8_block_linear() -> None:
    from heteroserve.platforms.cuda.plugin import (
        FLASHINFER_FP8_BLOCK_PRIORITY, TRITON_PRIORITY, flashinfer_kernel_specs,
    )

    spec = next(s for s in flashinfer_kernel_specs() if s.op == "linear.fp8_block")
    assert spec.name == "flashinfer" and spec.platforms == ("cuda",)
    assert FLASHINFER_FP8_BLOCK_PRIORITY > TRITON_PRIORITY  # the default where it can run
    assert spec.load().__name__ == "FlashInferFp8BlockLinear"


def _sm90_with_flashinfer() -> bool:
    import importlib.util

    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and importlib.util.find_spec("flashinfer") is not None)


def _on_the_gpu(mod, host: torch.nn.Module, dev: torch.device) -> tuple[torch.nn.Module, object]:
    """``host``'s tensors on ``dev`` and a processed ``FlashInferFp8BlockLinear`` for them."""
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(host.weight.to(dev), requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(host.weight_scale_inv.to(dev),
                                                requires_grad=False)
    linear = mod.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
    return layer, linear


@pytest.mark.skipif(not _sm90_with_flashinfer(), reason="needs an sm90 GPU and flashinfer")
@pytest.mark.parametrize("rows", [64, 256, 1024])
def test_graph_replay_equals_eager_on_the_gpu(monkeypatch, rows) -> None:
    """The real kernel, captured as a decode graph captures it: the replay after new inputs
    equals the eager call bitwise and the float64 oracle within the fp8 bound."""
    from heteroserve.platforms.cuda import flashinfer_fp8_block as mod
    from heteroserve.platforms.cuda.graph import CudaGraphRunner

    monkeypatch.setattr(mod, "CAPTURE", True)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(rows)
    host = _layer(512, 1024, gen)
    layer, linear = _on_the_gpu(mod, host, dev)
    assert mod.unavailable(dev) is None
    calls = _spy(monkeypatch, mod)
    x = torch.randn(rows, 1024, generator=gen).to(dev, torch.bfloat16)
    out: dict[str, torch.Tensor] = {}

    def step() -> None:
        out["y"] = linear.apply(layer, x)
    graph = CudaGraphRunner(dev).capture(step)
    assert calls, "the captured step did not reach flashinfer"
    x.copy_(torch.randn(rows, 1024, generator=gen).to(dev, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out["y"].clone()
    assert torch.equal(replayed, linear.apply(layer, x))
    assert rel_err(replayed.cpu(), _oracle(x.cpu(), host)) < 1e-2


@pytest.mark.skipif(not _sm90_with_flashinfer(), reason="needs an sm90 GPU and flashinfer")
@pytest.mark.parametrize("rows", [64, 66, 1024])
def test_fused_silu_and_mul_on_the_gpu(monkeypatch, rows) -> None:
    """The real runner reads the fused kernel's e4m3 input and padded group-major scales as
    laid out (the probe says so, and the product of a 66-row input, whose scales are padded,
    matches the float64 oracle of the unfused pair within the conformance suite's bf16 bound
    and about as closely as the runner's own quantization of the bf16 product), eagerly and
    from a replayed graph."""
    from heteroserve.conformance.tolerances import tolerance
    from heteroserve.platforms.cuda import flashinfer_fp8_block as mod
    from heteroserve.platforms.cuda.graph import CudaGraphRunner
    from heteroserve.platforms.triton.activation import silu_and_mul

    monkeypatch.setattr(mod, "CAPTURE", True)
    monkeypatch.setattr(mod, "FUSED_SILU_AND_MUL", True)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(rows + 1)
    host = _layer(512, 1024, gen)
    layer, linear = _on_the_gpu(mod, host, dev)
    assert mod.unavailable(dev) is None and mod.takes_prequantized(dev)
    x = (torch.randn(rows, 2048, generator=gen) * 3).to(dev, torch.bfloat16)
    bound = tolerance(torch.bfloat16).max_rel_err
    eager = linear.apply_silu_and_mul(layer, x)
    assert eager is not None
    fused_err = rel_err(eager.cpu(), _silu_and_mul_oracle(x, host))
    runner_err = rel_err(linear.apply(layer, silu_and_mul(x)).cpu(), _silu_and_mul_oracle(x, host))
    assert fused_err < bound and fused_err < 1.5 * runner_err + 1e-3, (fused_err, runner_err)
    out: dict[str, torch.Tensor] = {}

    def step() -> None:
        out["y"] = linear.apply_silu_and_mul(layer, x)
    graph = CudaGraphRunner(dev).capture(step)
    x.copy_((torch.randn(rows, 2048, generator=gen) * 3).to(dev, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out["y"].clone()
    assert torch.equal(replayed, linear.apply_silu_and_mul(layer, x))
    assert rel_err(replayed.cpu(), _silu_and_mul_oracle(x, host)) < bound
