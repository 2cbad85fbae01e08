"""Torch-native linear methods, one per quantization scheme (contract:
``core/kernels/linear.py``; checkpoint layouts documented in :mod:`.quant_pack`).

W8A8 schemes really quantize activations (dynamically, as the scheme says) and multiply
the dequantized operands in fp32, so results match a quantized reference, not the float
one. fp8 weights stay fp8 and are dequantized per call. W4A16 weights are unpacked once to
uint8 ``[K, N]`` plus per-group zeros and scales, and dequantized per call into ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.linear import FP8_BLOCK, LinearMethod
from heteroserve.core.kernels.registry import KernelRequest, Support
from heteroserve.platforms.cpu.compiled import cxx_compiler
from heteroserve.platforms.cpu.features import detect_cpu_features
from heteroserve.platforms.cpu.prepack import packed_linear, prepack_weight
from heteroserve.platforms.cpu.quant_pack import AWQ_ORDER, unpack_nibbles

_MIN_SCALE = 1e-12
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


def _get(layer: torch.nn.Module, name: str) -> torch.Tensor:
    tensor = getattr(layer, name, None)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"linear layer {type(layer).__name__} has no tensor {name!r}")
    return tensor


def _set(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace or add a frozen parameter ``name`` on ``layer``."""
    if name in layer._parameters:
        delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add ``bias`` (in fp32 when ``y`` is fp32), cast to ``x.dtype``, restore leading dims."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _check_k(x: torch.Tensor, k: int, scheme: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{scheme}: input has {x.shape[-1]} features, the layer expects {k}")
    return x.reshape(-1, k)


def _fp8_of(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in _FP8_DTYPES else torch.float8_e4m3fn


def quantize_fp8_dynamic(x: torch.Tensor, fp8_dtype: torch.dtype, group: int | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric fp8 quantization of ``x [M, K]``: per tensor (``group`` None) or per
    row and ``group``-column block (``K % group == 0``). ``s = max(amax / fp8_max, 1e-12)``,
    ``q = clamp(x / s)`` rounded to fp8. Returns ``(q fp8 [M, K], s)`` with ``s`` fp32 ``[1]``
    or ``[M, K / group]``."""
    fmax = float(torch.finfo(fp8_dtype).max)
    xf = x.to(torch.float32)
    if group is None:
        scale = (xf.abs().amax() / fmax).clamp(min=_MIN_SCALE).reshape(1)
        return (xf / scale).clamp(-fmax, fmax).to(fp8_dtype), scale
    blocks = xf.view(xf.shape[0], -1, group)
    scale = (blocks.abs().amax(dim=-1) / fmax).clamp(min=_MIN_SCALE)
    q = (blocks / scale[..., None]).clamp(-fmax, fmax).to(fp8_dtype)
    return q.view_as(xf), scale


def quantize_int8_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``s = max(amax / 127, 1e-12)``, ``q = clamp(round(x / s),
    -128, 127)`` (half to even). ``x [M, K]`` -> ``(q int8 [M, K], s fp32 [M, 1])``."""
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=_MIN_SCALE)
    return torch.round(xf / scale).clamp(-128, 127).to(torch.int8), scale


class UnquantizedLinear(LinearMethod):
    """``weight [N, K]`` in the model dtype; ``y = x @ W^T + bias`` with ``F.linear``, on any
    device. The weight stays a plain tensor (what a ``torch.compile`` trace can take)."""

    scheme = "unquantized"
    serves_lm_head = True

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, _get(layer, "weight").to(x.dtype), b)


class OneDNNPrepackedLinear(UnquantizedLinear):
    """:class:`UnquantizedLinear` with the weight prepacked for oneDNN at load where oneDNN
    runs its dtype natively (:mod:`.prepack`); ``layer.weight`` is then an opaque oneDNN
    tensor that only ``apply`` reads (``layer.onednn_packed`` says so). Weights it cannot
    pack stay plain and take ``F.linear``. The cpu platform's choice for the dtypes
    :func:`supports_prepacked` accepts in an eager engine (a compiled one declines it:
    :mod:`.compiled`)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        packed = prepack_weight(_get(layer, "weight"))
        layer.onednn_packed = packed is not None
        if packed is not None:
            _set(layer, "weight", packed)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        # the flag set at load, not the tensor's ``is_mkldnn``: a torch.compile trace's
        # stand-in for the packed tensor does not report oneDNN's layout
        if getattr(layer, "onednn_packed", False):
            return packed_linear(x, _get(layer, "weight"), bias)
        return super().apply(layer, x, bias)


def supports_prepacked(request: KernelRequest) -> Support:
    """Whether :class:`OneDNNPrepackedLinear` serves ``request``: a dtype oneDNN runs
    natively on this host, in an engine that does not compile the model (inductor packs a
    compiled model's weights itself, for the GEMM kernels it picks: :mod:`.compiled`)."""
    if request.torch_compile and cxx_compiler() is not None:
        return Support.no("the compiled model's GEMMs pack their weights at compile time "
                          "(--enable-torch-compile)")
    dtypes = detect_cpu_features().prepack_dtypes()
    if request.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes) or "none"
        return Support.no(f"oneDNN does not run {str(request.dtype).removeprefix('torch.')} "
                          f"natively on this host (prepacks: {names})")
    return Support.yes()


class Fp8PerTensorLinear(LinearMethod):
    """W8A8 fp8: ``weight [N, K]`` fp8, ``weight_scale [1]``; activations quantized per tensor."""

    scheme = "fp8_per_tensor"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _set(layer, "weight_scale", _get(layer, "weight_scale").to(torch.float32).reshape(1))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        weight, w_scale = _get(layer, "weight"), _get(layer, "weight_scale")
        x2 = _check_k(x, weight.shape[1], self.scheme)
        qx, x_scale = quantize_fp8_dynamic(x2, _fp8_of(weight), None)
        y = (qx.to(torch.float32) @ weight.to(torch.float32).t()) * (x_scale * w_scale.reshape(1))
        return _finish(y, x, bias)


class Fp8PerChannelLinear(LinearMethod):
    """W8A8 fp8: ``weight [N, K]`` fp8, ``weight_scale [N, 1]`` per output channel;
    activations quantized per token (one fp8 scale per row)."""

    scheme = "fp8_per_channel"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = _get(layer, "weight")
        _set(layer, "weight_scale",
             _get(layer, "weight_scale").to(torch.float32).reshape(weight.shape[0], 1))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        weight, w_scale = _get(layer, "weight"), _get(layer, "weight_scale")
        k = weight.shape[1]
        x2 = _check_k(x, k, self.scheme)
        qx, x_scale = quantize_fp8_dynamic(x2, _fp8_of(weight), k)  # one group = one row
        y = (qx.to(torch.float32) @ weight.to(torch.float32).t()) * x_scale * w_scale.reshape(1, -1)
        return _finish(y, x, bias)


class Fp8BlockLinear(LinearMethod):
    """W8A8 fp8, DeepSeek style: ``weight [N, K]`` fp8 with one ``weight_scale_inv`` per
    128x128 block; activations quantized per token and 128-column group."""

    scheme = "fp8_block"


    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        weight, w_scale = _get(layer, "weight"), _get(layer, "weight_scale_inv")
        n, k = weight.shape
        nb, kb = w_scale.shape
        if nb * FP8_BLOCK < n or kb * FP8_BLOCK < k:
            raise ValueError(f"fp8_block: weight_scale_inv {tuple(w_scale.shape)} does not "
                             f"cover weight {tuple(weight.shape)}")
        x2 = _check_k(x, k, self.scheme)
        kp = kb * FP8_BLOCK
        qx, x_scale = quantize_fp8_dynamic(F.pad(x2.to(torch.float32), (0, kp - k)),
                                           _fp8_of(weight), FP8_BLOCK)
        x_deq = (qx.to(torch.float32).view(-1, kb, FP8_BLOCK) * x_scale[..., None]).view(-1, kp)
        w = F.pad(weight.to(torch.float32), (0, kp - k, 0, nb * FP8_BLOCK - n))
        w = (w.view(nb, FP8_BLOCK, kb, FP8_BLOCK) * w_scale.to(torch.float32)[:, None, :, None])
        y = x_deq @ w.view(nb * FP8_BLOCK, kp)[:n].t()
        return _finish(y, x, bias)


class Int8W8A8Linear(LinearMethod):
    """W8A8 int8: ``weight [N, K]`` int8, ``weight_scale [N, 1]`` per channel; activations
    quantized per token, symmetric."""

    scheme = "int8_w8a8"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = _get(layer, "weight")
        _set(layer, "weight_scale",
             _get(layer, "weight_scale").to(torch.float32).reshape(weight.shape[0], 1))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        weight, w_scale = _get(layer, "weight"), _get(layer, "weight_scale")
        x2 = _check_k(x, weight.shape[1], self.scheme)
        qx, x_scale = quantize_int8_dynamic(x2)
        y = (qx.to(torch.float32) @ weight.to(torch.float32).t()) * x_scale * w_scale.reshape(1, -1)
        return _finish(y, x, bias)


class _W4A16Linear(LinearMethod):
    """Shared apply of the 4-bit schemes over the unpacked layout: ``w4_q [K, N]`` uint8,
    ``w4_zeros [groups, N]`` uint8 (true zero points), ``scales [groups, N]``, ``w4_g_idx [K]``
    int64."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        q, zeros = _get(layer, "w4_q"), _get(layer, "w4_zeros")
        scales, g_idx = _get(layer, "scales"), _get(layer, "w4_g_idx")
        x2 = _check_k(x, q.shape[0], self.scheme)
        w_t = ((q.to(torch.float32) - zeros.to(torch.float32).index_select(0, g_idx))
               * scales.to(torch.float32).index_select(0, g_idx))
        y = x2 @ w_t.to(x.dtype)
        return _finish(y, x, bias)

    @staticmethod
    def _store(layer: torch.nn.Module, q: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, drop: tuple[str, ...]) -> None:
        for name in drop:
            if hasattr(layer, name):
                delattr(layer, name)
        _set(layer, "w4_q", q)
        _set(layer, "w4_zeros", zeros)
        _set(layer, "w4_g_idx", g_idx)


class AwqW4A16Linear(_W4A16Linear):
    """AWQ 4-bit weights (fp16 scales, per-group zero points), activations unquantized."""

    scheme = "awq_w4a16"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qweight, qzeros = _get(layer, "qweight"), _get(layer, "qzeros")
        k, groups = qweight.shape[0], qzeros.shape[0]
        if groups == 0 or k % groups:
            raise ValueError(f"awq_w4a16: {k} input rows do not split into {groups} groups")
        g_idx = torch.arange(k, device=qweight.device) // (k // groups)
        self._store(layer, unpack_nibbles(qweight, AWQ_ORDER), unpack_nibbles(qzeros, AWQ_ORDER),
                    g_idx, ("qweight", "qzeros"))


class GptqW4A16Linear(_W4A16Linear):
    """GPTQ (v1 zero points) 4-bit weights, optional act-order ``g_idx``; activations
    unquantized."""

    scheme = "gptq_w4a16"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qweight, qzeros = _get(layer, "qweight"), _get(layer, "qzeros")
        k, groups = qweight.shape[0] * 8, qzeros.shape[0]
        g_idx = getattr(layer, "g_idx", None)
        if isinstance(g_idx, torch.Tensor):
            g_idx = g_idx.to(torch.long)
            if g_idx.shape != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                raise ValueError(f"gptq_w4a16: g_idx must be [{k}] with values in 0..{groups - 1}")
        else:
            if groups == 0 or k % groups:
                raise ValueError(f"gptq_w4a16: {k} input rows do not split into {groups} groups")
            g_idx = torch.arange(k, device=qweight.device) // (k // groups)
        q = unpack_nibbles(qweight.t()).t().contiguous()  # nibble j of row-word w -> row 8w+j
        zeros = unpack_nibbles(qzeros) + 1
        self._store(layer, q, zeros, g_idx, ("qweight", "qzeros", "g_idx"))
