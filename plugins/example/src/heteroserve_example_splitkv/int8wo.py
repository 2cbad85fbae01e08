"""An int8 weight-only, per-output-channel quantization scheme with its own checkpoint format,
added by a plugin without touching heteroserve's core.

Checkpoint format (``config.json``)::

    "quantization_config": {"quant_method": "example-int8-wo", "bits": 8,
                            "ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj"]}

Every quantized linear module ``<m>`` stores ``<m>.qweight [N, K]`` int8 and ``<m>.scales
[N]`` (fp16, bf16 or fp32), with ``W[n, k] = qweight[n, k] * scales[n]``; modules matched by
``ignore`` (an exact name, a name suffix or ``re:<regex>``) keep their ``weight``. The loader
(:func:`convert`) turns these into the scheme ``example_int8_wo``: ``weight [N, K]`` int8 and
``weight_scale [N, 1]`` fp32. Activations stay in the model dtype (weight-only).
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.plugin_api import (
    UNQUANTIZED, KernelRequest, LayerQuant, LinearMethod, LinearShape, ParamSpec, QuantFormat,
    QuantizationError, Support, module_matches,
)

METHOD = "example-int8-wo"
SCHEME = "example_int8_wo"
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def convert(suffix: str, tensor: torch.Tensor, full_shape: tuple[int, int]
            ) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor of a ``[N, K]`` layer -> the scheme's tensors. Raises
    ``ValueError`` naming the tensor when its name, shape or dtype is not the format's."""
    n, k = full_shape
    if suffix == "qweight":
        if tensor.dtype != torch.int8 or tuple(tensor.shape) != (n, k):
            raise ValueError(f"qweight is {tensor.dtype} {list(tensor.shape)}, expected "
                             f"int8 [{n}, {k}]")
        return [("weight", tensor)]
    if suffix == "scales":
        if tensor.dtype not in _SCALE_DTYPES or tuple(tensor.shape) != (n,):
            raise ValueError(f"scales is {tensor.dtype} {list(tensor.shape)}, expected a "
                             f"float [{n}]")
        return [("weight_scale", tensor.to(torch.float32).reshape(n, 1))]
    raise ValueError(f"unexpected tensor {suffix} for an {METHOD} layer (qweight, scales)")


class Int8WeightOnlyFormat(QuantFormat):
    """``quant_method: example-int8-wo``; raises :class:`QuantizationError` naming the field
    for anything but 8-bit weights or a malformed ``ignore``."""

    method = METHOD

    def __init__(self, cfg: dict[str, Any]) -> None:
        bits = cfg.get("bits", 8)
        if bits != 8:
            raise QuantizationError(f"quantization_config.bits={bits!r}: {METHOD} stores "
                                    "8-bit weights only")
        ignore = cfg.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
            raise QuantizationError("quantization_config.ignore must be a list of module names")
        self.ignore: list[str] = ignore
        self._quant = LayerQuant(SCHEME, label="int8 weight-only per-channel", convert=convert)

    def layer_quant(self, prefix: str) -> LayerQuant:
        return UNQUANTIZED if module_matches(prefix, self.ignore) else self._quant

    def schemes(self) -> tuple[str, ...]:
        return (SCHEME,)

    def describe(self) -> str:
        return f"{METHOD} (weights int8, one scale per output channel; activations unquantized)"


class Int8WeightOnlyLinear(LinearMethod):
    """``y = (x @ weight^T) * weight_scale^T (+ bias)``, computed in fp32 and returned in
    ``x.dtype``. After loading, the weight is kept transposed (``[K, N]``) so the matmul
    reads it row-major."""

    scheme = SCHEME

    def create_weights(self, shape: LinearShape) -> dict[str, ParamSpec]:
        n, k = shape.output_size, shape.input_size
        return {"weight": ParamSpec((n, k), torch.int8, output_dim=0, input_dim=1),
                "weight_scale": ParamSpec((n, 1), torch.float32, output_dim=0)}

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.weight_t = layer.weight.data.t().contiguous()  # [K, N] int8
        layer.scale_row = layer.weight_scale.data.reshape(1, -1).contiguous()  # [1, N] fp32

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.matmul(x.to(torch.float32), layer.weight_t.to(torch.float32)) * layer.scale_row
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype)


def quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """float ``W [N, K]`` -> the scheme's tensors: ``weight = round(W / s)`` int8 with ``s =
    amax(|W[n]|) / 127`` per output row (rows of zeros get ``s = 1``)."""
    w = w.to(torch.float64)
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale.to(torch.float32)}


def dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scheme's meaning: float64 ``W = weight * weight_scale`` (``[N, K]``)."""
    return tensors["weight"].to(torch.float64) * tensors["weight_scale"].to(torch.float64)


def supports(request: KernelRequest) -> Support:
    """Any device torch runs on; model dtypes fp32, bf16 and fp16."""
    if request.dtype not in _SCALE_DTYPES:
        return Support.no(f"dtype {request.dtype} is not a model dtype")
    return Support.yes()
