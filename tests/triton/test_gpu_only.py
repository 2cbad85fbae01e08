"""Checks that need a CUDA GPU (fp8 has no interpreter support; CUDA graphs need a device):
skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.conformance import quantize
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.core.kernels.linear import LinearShape

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None,
                                 reason="needs an NVIDIA GPU")]


def _fp8_ok() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("scheme,tokens", [("fp8_per_tensor", 7), ("fp8_per_tensor", 40),
                                           ("fp8_per_tensor", 1500),
                                           ("fp8_block", 33), ("fp8_per_channel", 1),
                                           ("fp8_per_channel", 300)])
def test_fp8_linear(scheme: str, tokens: int) -> None:
    if not _fp8_ok():
        pytest.skip("fp8 needs compute capability 8.9+")
    from heteroserve.platforms.triton import linear_w8a8 as w8

    gen = torch.Generator().manual_seed(tokens)
    k, n, dt = 512, 384, torch.bfloat16
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * k ** -0.5
    fp8 = torch.float8_e4m3fn
    ckpt = {"fp8_per_tensor": quantize.quantize_fp8_per_tensor,
            "fp8_per_channel": quantize.quantize_fp8_per_channel,
            "fp8_block": quantize.quantize_fp8_block}[scheme](w, fp8)
    method = {"fp8_per_tensor": w8.Fp8PerTensorLinear, "fp8_per_channel": w8.Fp8PerChannelLinear,
              "fp8_block": w8.Fp8BlockLinear}[scheme]()
    layer = torch.nn.Module()
    for name in method.create_weights(LinearShape(k, n, dt)):
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].cuda(), requires_grad=False))
    method.process_weights_after_loading(layer)
    x = quantize.w8a8_activations(gen, tokens, k, scheme, dt, fp8)
    out = method.apply(layer, x.cuda())
    assert rel_err(out, oracle.linear(scheme, x, ckpt, 128, None, fp8)) < 2e-2


def test_cuda_graph_runner_replays_new_inputs() -> None:
    from heteroserve.platforms.cuda.graph import CudaGraphRunner
    from heteroserve.platforms.triton.norm import rms_norm

    x = torch.randn(64, 512, device="cuda")
    w = torch.randn(512, device="cuda")
    out = torch.empty_like(x)
    graph = CudaGraphRunner(torch.device("cuda")).capture(lambda: out.copy_(rms_norm(x, w, 1e-6)))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rms_norm(x, w, 1e-6))
