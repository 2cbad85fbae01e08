"""fp8 128x128-block linears whose large products run on flashinfer's Hopper block-scale GEMM.

``flashinfer.gemm.fp8_blockscale_gemm_sm90`` (flashinfer 0.7.4) wraps TensorRT-LLM's runner:
a bf16 ``input [M, K]`` is quantized per token and 128-column group into a workspace
(``scale = amax / 448``), then a DeepGEMM kernel, compiled at first use for its tile by NVRTC
(sm90a only), multiplies it by the fp8 ``weight [N, K]`` with ``weight_scale [ceil(N / 128),
K / 128]`` (fp32, row-major), promoting each 128-column group's fp8 products into an fp32
accumulator while the next group's tensor-core work runs. That promotion inside the MMA
pipeline is what cuBLASLt's block-scaled GEMM lacks here (on an H100 at 8192 rows it ran
0.85-1.49x bf16 by layer, ``results/h100-20261207-0939-fp8_block_tiles.json``).

:class:`FlashInferFp8BlockLinear` is the ``fp8_block`` method of ``platforms/triton`` with one
change: products of at least :data:`MIN_ROWS` bf16 rows whose shape the kernel takes (``N`` a
multiple of 64, ``K`` of 128, an e4m3fn weight) go to flashinfer; every other input (the
decode GEMV, fp16 or fp32 rows, a device whose probe failed) takes the Triton method's path.
Decode graphs capture it where :data:`CAPTURE` is set (the default): a graph's warm-up run
(``CudaGraphRunner``) compiles and loads the tile before capture, each call's workspace is a
tensor of the graph's pool, and the kernels' arguments (the tensor maps, the workspace
address) are fixed at capture, as the replay needs. A probe at weight-processing time builds flashinfer's module and checks one
small product against the dequantized matmul; on any failure the layer keeps the Triton path
and the reason is logged once per device.

With :data:`FUSED_SILU_AND_MUL` (the default), the down projection's SiLU-and-mul
(:meth:`FlashInferFp8BlockLinear.apply_silu_and_mul`) writes the runner's fp8 input and its 1x128 scales itself (:func:`~heteroserve.platforms.triton.quant.
quantize_rows` with ``gated``), where the probe found the runner reads pre-quantized inputs
as :func:`prequantized_input` lays them out; that skips the bf16 product's write and the
runner's quantization pass over it.

The first product of each new tile compiles it with nvcc (about 2 s) into
``$TRTLLM_DG_CACHE_DIR/cache`` (default ``~/.tensorrt_llm/cache``), where later processes find
it; ``benchmarks/flashinfer_aot.sh`` builds the module and the tiles of given layer shapes
ahead of time.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton.linear_params import get_param, rows
from heteroserve.platforms.triton.linear_w8a8 import Fp8BlockLinear
from heteroserve.platforms.triton.quant import quantize_rows

log = logging.getLogger(__name__)

#: rows from which a bf16 product goes to flashinfer (below: cuBLASLt's block-scaled GEMM /
#: the Triton GEMV). 64: on an H100 every Llama-3.1-8B layer ran faster through it at 64-512
#: rows than through cuBLASLt, eagerly and from CUDA graphs (gate_up at 256 rows within 1 %;
#: ``results/h100-20261207-1913-*``); below 32 rows the runner switches to a swapped-operand
#: kernel this threshold keeps out
MIN_ROWS = 64
#: whether a CUDA-graph capture may record it (else captured steps take the Triton method's
#: path). A replay after new inputs equals the eager call bitwise and the float64 oracle at
#: 64, 256 and 1024 rows on an H100 (``results/h100-20261207-2138-tests.log``); from graphs
#: it lifted fp8-block offline throughput (1024 x 1024/256) from 31,362 to 34,391 total tok/s
#: there (``results/h100-20261207-2138-fp8fi-*``)
CAPTURE = True
#: whether the down projection's SiLU-and-mul hands the runner fp8 rows (where the probe's
#: pre-quantized product matched); off: a bf16 launch, quantized again inside the runner. On
#: an H100, offline (1024 x 1024/256) with the decode graphs capturing the GEMM: 35,486 and
#: 35,432 total tok/s against 34,527 and 34,386 unfused, in both run orders
#: (``results/h100-20261207-22{20,24}-fp8fi-*``); the first fused kernel, two passes in one
#: program per row and 128-column group, had run slower (32,842 against 34,391, ``-2138-``)
FUSED_SILU_AND_MUL = True
#: what the kernel takes: ``N`` a multiple of this, ``K`` a multiple of :data:`FP8_BLOCK`
N_MULTIPLE = 64

BlockScaleGemm = Callable[..., torch.Tensor]


def load_gemm() -> BlockScaleGemm:
    """``flashinfer.gemm.fp8_blockscale_gemm_sm90`` (imported on first use)."""
    from flashinfer.gemm import fp8_blockscale_gemm_sm90  # noqa: PLC0415

    return fp8_blockscale_gemm_sm90


#: e4m3's largest finite value: the runner's per-group scale is ``amax / E4M3_MAX``
E4M3_MAX = 448.0
#: per device: why the bf16 path is unavailable (None: ready)
_READY: dict[tuple[str, int | None], str | None] = {}
#: per device: whether the probe's pre-quantized product matched (the fused SiLU-and-mul path)
_PREQUANTIZED: dict[tuple[str, int | None], bool] = {}


def unavailable(device: torch.device) -> str | None:
    """Why flashinfer's block-scale GEMM cannot serve ``device``, or None: probed once per
    device (compute capability 9.x, an nvcc for new tiles (:func:`nvcc_path`), the module
    builds and loads, a 126 x 256 x 512 product within 2 % of the float64 product of the
    per-group quantized activations and the dequantized weight); the same product from
    :func:`prequantized_input` decides :func:`takes_prequantized`. Call it outside graph
    capture."""
    key = (device.type, device.index)
    if key not in _READY:
        _READY[key], _PREQUANTIZED[key] = _probe(device)
        if _READY[key]:
            log.warning("fp8_block on %s: flashinfer's block-scale GEMM unavailable (%s); "
                        "the Triton method's path serves every product", device, _READY[key])
        elif not _PREQUANTIZED[key]:
            log.warning("fp8_block on %s: flashinfer's block-scale GEMM did not match on a "
                        "pre-quantized input; the SiLU-and-mul stays a bf16 launch", device)
    return _READY[key]


def takes_prequantized(device: torch.device) -> bool:
    """Whether the probe found the runner reading :func:`prequantized_input`'s layout right
    (False before :func:`unavailable` probed ``device``)."""
    return _PREQUANTIZED.get((device.type, device.index), False)


def prequantized_input(x2: torch.Tensor, gated: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 [M, K]`` bf16 (with ``gated``, ``[M, 2K] = [gate | up]``, quantized as
    ``silu(gate) * up``) -> ``(q [M, K] e4m3fn, scales)`` as the runner's own 1x128 pass
    writes them (``scale_1x128_kernel``): per row and 128-column group ``amax / 448``, fp32,
    group by group with ``M`` padded to a multiple of 4 (element ``(m, g)`` at ``g *
    ceil(M / 4) * 4 + m``), passed as the contiguous ``[K / 128, ceil(M / 4) * 4]`` tensor."""
    q, s = quantize_rows(x2, torch.float8_e4m3fn, E4M3_MAX, FP8_BLOCK, group_major=True,
                         row_multiple=4, gated=gated)
    return q[: x2.shape[0]], s.t()


def nvcc_path() -> str | None:
    """The nvcc the runner compiles new tiles with: ``$TRTLLM_DG_NVCC_COMPILER``, else
    ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on ``PATH``; None when that file is absent."""
    named = os.environ.get("TRTLLM_DG_NVCC_COMPILER")
    if not named and os.environ.get("CUDA_HOME"):
        named = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return shutil.which(named or "nvcc")


def _probe(device: torch.device) -> tuple[str | None, bool]:
    """(why the bf16 path is unavailable or None, whether the pre-quantized path matched)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        return f"compute capability {torch.cuda.get_device_capability(device)} is not 9.x", False
    if device.type == "cuda" and nvcc_path() is None:  # a new tile mid-serving could not build
        return "no nvcc to compile its kernels (set CUDA_HOME or TRTLLM_DG_NVCC_COMPILER)", False
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, n, k = 126, 256, 512  # M not a multiple of 4: the scales' padded stride shows
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.float8_e4m3fn)
    ws = torch.rand(n // FP8_BLOCK, k // FP8_BLOCK, generator=gen).to(device) + 0.5
    try:
        y = load_gemm()(x, w, None, ws)
    except (ImportError, RuntimeError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", False
    err = _probe_error(y, x, w, ws)
    if err >= 2e-2:
        return f"probe product off by {err:.2e} of its largest output", False
    q, scales = prequantized_input(x)
    try:
        y_pre = load_gemm()(q, w, scales, ws)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        log.info("fp8_block: pre-quantized input refused (%s)", exc)
        return None, False
    return None, _probe_error(y_pre, x, w, ws) < 2e-2


def _probe_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> float:
    """``|y - ref|_max / |ref|_max`` against the float64 product of ``x`` quantized per row
    and 128 columns and the block-dequantized ``w``."""
    m, k = x.shape
    w_ref = w.double() * ws.double().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(
        FP8_BLOCK, 1)
    groups = x.double().reshape(m, k // FP8_BLOCK, FP8_BLOCK)
    x_scale = groups.abs().amax(-1, keepdim=True) / E4M3_MAX
    x_ref = ((groups / x_scale).to(torch.float8_e4m3fn).double() * x_scale).reshape(m, k)
    ref = x_ref @ w_ref.t()
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def takes(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x2 [M, K] @ weight[N, K]^T`` goes to flashinfer: bf16 rows, at least
    :data:`MIN_ROWS` of them, an e4m3fn weight with ``N % 64 == 0`` and ``K % 128 == 0``,
    no graph capture on this stream unless :data:`CAPTURE`, and the device's probe passed."""
    n, k = weight.shape
    if (x2.dtype != torch.bfloat16 or x2.shape[0] < MIN_ROWS
            or weight.dtype != torch.float8_e4m3fn or n % N_MULTIPLE or k % FP8_BLOCK):
        return False
    if not CAPTURE and x2.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return unavailable(x2.device) is None


class FlashInferFp8BlockLinear(Fp8BlockLinear):
    """``fp8_block`` (``weight [N, K]`` fp8, ``weight_scale_inv [ceil(N/128), ceil(K/128)]``
    fp32): products of :data:`MIN_ROWS`+ bf16 rows through flashinfer's sm90 block-scale GEMM
    (activation quantized per token and 128-column group inside it), the rest as
    :class:`~heteroserve.platforms.triton.linear_w8a8.Fp8BlockLinear`."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        unavailable(get_param(layer, "weight").device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight = get_param(layer, "weight")
        x2 = rows(x, weight.shape[1], self.scheme)
        if not takes(x2, weight):
            return super().apply(layer, x, bias)
        if x2.stride(0) != x2.shape[1]:  # the kernel reads rows at a stride of K
            x2 = x2.contiguous()
        return _product(layer, x2, None, bias, x.shape[:-1])

    def apply_silu_and_mul(self, layer: torch.nn.Module, x: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``x [..., 2K] = [gate | up]`` -> ``apply(silu(gate) * up)`` ``[..., N]``: one Triton
        kernel writes the runner's fp8 input and scales (:func:`prequantized_input`), then
        the GEMM; None (the caller runs the SiLU-and-mul op and :meth:`apply`) where
        :data:`FUSED_SILU_AND_MUL` is off, :func:`takes` refuses the rows or the probe's
        pre-quantized product did not match."""
        weight = get_param(layer, "weight")
        x2 = x.reshape(-1, x.shape[-1])
        if (not FUSED_SILU_AND_MUL or x2.shape[-1] != 2 * weight.shape[1]
                or not takes(x2, weight) or not takes_prequantized(x2.device)):
            return None
        q, scales = prequantized_input(x2, gated=True)
        return _product(layer, q, scales, bias, x.shape[:-1])


def _product(layer: torch.nn.Module, a: torch.Tensor, a_scale: torch.Tensor | None,
             bias: torch.Tensor | None, lead: torch.Size) -> torch.Tensor:
    """flashinfer's ``a [M, K] @ weight^T`` (``a`` bf16 with ``a_scale`` None, or e4m3 with
    :func:`prequantized_input`'s scales), plus ``bias``, shaped ``[*lead, N]``."""
    y = load_gemm()(a, get_param(layer, "weight"), a_scale, get_param(layer, "weight_scale_inv"))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])
