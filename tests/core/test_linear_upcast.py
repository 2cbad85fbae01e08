"""``ReplicatedLinear.forward_upcast``: an fp32 layer fed narrower activations (DeepSeek's
router) uses the method's ``apply_upcast`` where it has one, else casts and applies."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.dispatch import resolve_dispatch
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.platforms.cpu import plugin


def _router() -> ReplicatedLinear:
    registry = KernelRegistry()
    plugin.heteroserve_register_kernels(registry)
    table = resolve_dispatch(registry, KernelRequest("cpu", "cpu", torch.float32),
                             linear_schemes=("unquantized",))
    ctx = LayerContext(table, torch.float32, torch.device("cpu"), 0, 1)
    layer = ReplicatedLinear(ctx, 64, 8, bias=False, scheme="unquantized")
    layer.load("weight", torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    layer.method.process_weights_after_loading(layer)
    return layer


def test_without_an_upcast_kernel_the_row_is_widened_then_applied() -> None:
    layer = _router()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    out = layer.forward_upcast(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, layer(x.float()))
    assert torch.equal(layer.forward_upcast(x.float()), layer(x.float()))


def test_an_upcast_kernel_takes_the_narrow_row_as_it_is(monkeypatch) -> None:
    layer = _router()
    seen: list[torch.dtype] = []

    def upcast(lay, x, bias=None):
        seen.append(x.dtype)
        return torch.full((x.shape[0], 8), 7.0)

    monkeypatch.setattr(layer.method, "apply_upcast", upcast)
    out = layer.forward_upcast(torch.ones(1, 64, dtype=torch.bfloat16))
    assert seen == [torch.bfloat16] and torch.equal(out, torch.full((1, 8), 7.0))
