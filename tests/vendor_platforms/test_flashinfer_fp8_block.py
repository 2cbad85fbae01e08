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


@pytest.fixture
def method(flashinfer_double, monkeypatch):
    from heteroserve.platforms.cuda import flashinfer_fp8_block as mod

    monkeypatch.setattr(mod, "MIN_ROWS", MIN_ROWS)
    monkeypatch.setattr(mod, "_READY", {})
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
        monkeypatch.setattr(method, "_probe", lambda device: "RuntimeError: no sm90")
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
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(host.weight.to(dev), requires_grad=False)
    layer.weight_scale_inv = torch.nn.Parameter(host.weight_scale_inv.to(dev),
                                                requires_grad=False)
    linear = mod.FlashInferFp8BlockLinear()
    linear.process_weights_after_loading(layer)
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
