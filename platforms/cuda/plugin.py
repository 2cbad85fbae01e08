"""Entry point of the built-in ``cuda`` platform plugin.

Registers the CUDA platform, the shared Triton kernels for ``cuda`` (name ``triton``, above
the torch-native fallback) and flashinfer adapters (name ``flashinfer``, below Triton and
selected with ``--kernel OP=flashinfer``) whose ``supports`` says "flashinfer not installed"
when it is absent. Loading this plugin imports neither triton nor flashinfer.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.cuda.platform import CudaPlatform
from heteroserve.platforms.triton.registration import (
    KV_CACHE_DTYPES, attention_supports, fp8_supports, triton_kernel_specs,
)

PLATFORMS = ("cuda",)
TRITON_PRIORITY = 10
#: below Triton: batch-1 decode from CUDA graphs measured 224.6 tok/s with flashinfer attention
#: against 240.2 with Triton on an H200; --kernel attention=flashinfer selects it
FLASHINFER_PRIORITY = 8
#: below Triton: in a decode graph one bf16 row of hidden 4096 took 1.52 / 1.83 us (rms_norm /
#: fused_add_rms_norm) against Triton's 1.24 / 1.29 on an H200; --kernel rms_norm=flashinfer
FLASHINFER_NORM_PRIORITY = 5
#: below Triton's MLA (10): on an H100 (2026-12-07) it passed the cuda MLA conformance but
#: DeepSeek-V2-Lite batch-1 decode ran 297.1 tok/s against Triton's 446.7
#: (results/h100-20261207-0742-fi_mla-*); --kernel mla_attention=flashinfer selects it
FLASHINFER_MLA_PRIORITY = 8
#: above Triton: Triton decode and short extends; extends of 2048+ new tokens a sequence in
#: cuDNN's fused attention (platforms/cuda/sdpa_extend.py, 2026-12-05: a 100k prompt 8.88 ->
#: 7.64-7.74 s on an H100); --kernel attention=triton keeps the Triton extend everywhere
SDPA_EXTEND_PRIORITY = 11
#: below Triton (10) and cuDNN's extends (11): on an H100 (2026-12-07 09:17, one call, results/
#: h100-20261207-0917-prefill_ab-*) an 8k prompt's time to first token was 0.2189 s with
#: flashinfer's paged prefill (FA3) against 0.2183 s with cuDNN, no gain, and its module takes
#: 152 s to JIT-build; --kernel attention=triton_flashinfer_extend selects it
FLASHINFER_EXTEND_PRIORITY = 9
#: above Triton: fp8_block linears whose products of 64+ rows run on flashinfer's sm90
#: block-scale GEMM (DeepGEMM kernels). On an H100 (2026-12-07 19:13, one call, results/
#: h100-20261207-1913-fp8fi-*) Llama-3.1-8B-shaped fp8-block offline (256 x 1024/256) ran
#: 33,799 total tok/s with it outside the decode graphs (34,706 with them capturing it too)
#: against 32,023 with cuBLASLt's block-scaled GEMM (bf16 28,019), and each layer's product
#: was faster eagerly at 64-8192 rows (but gate_up at 2048-4096, within 5 %); where
#: flashinfer, sm90 or nvcc is missing, its probe sends every product to the Triton method's
#: path; --kernel linear.fp8_block=triton keeps cuBLASLt everywhere
FLASHINFER_FP8_BLOCK_PRIORITY = 11
_PKG = "heteroserve.platforms.cuda"


def flashinfer_missing() -> str | None:
    """Why flashinfer cannot be used, or None (imports nothing)."""
    try:
        found = importlib.util.find_spec("flashinfer") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "flashinfer not installed (pip install flashinfer-python)"


def _flashinfer_common(device_type: str) -> Callable[[KernelRequest], Support]:
    def supports(request: KernelRequest) -> Support:
        why = flashinfer_missing()
        if why:
            return Support.no(why)
        if request.device_type != device_type:
            return Support.no(f"flashinfer runs on CUDA devices, not {request.device_type!r}")
        if request.dtype not in (torch.bfloat16, torch.float16):
            return Support.no(f"flashinfer kernels take bf16/fp16, not {request.dtype}")
        return Support.yes()

    return supports


def _flashinfer_attention(device_type: str) -> Callable[[KernelRequest], Support]:
    common = _flashinfer_common(device_type)

    def supports(request: KernelRequest) -> Support:
        base = common(request)
        if not base:
            return base
        from heteroserve.platforms.cuda.flashinfer_attention import HEAD_SIZES  # torch only

        if request.head_size is not None and request.head_size not in HEAD_SIZES:
            return Support.no(f"head size {request.head_size} not in {list(HEAD_SIZES)}")
        return Support.yes()

    return supports


def _flashinfer_mla(device_type: str) -> Callable[[KernelRequest], Support]:
    common = _flashinfer_common(device_type)

    def supports(request: KernelRequest) -> Support:
        base = common(request)
        if not base:
            return base
        from heteroserve.platforms.cuda.flashinfer_mla import unsupported  # torch only

        why = unsupported(request.dtype, request.kv_lora_rank, request.qk_rope_head_dim)
        if why:
            return Support.no(why)
        if request.kv_cache_dtype != "auto":
            return Support.no(f"the latent cache stays in the model dtype, not "
                              f"{request.kv_cache_dtype}")
        return Support.yes()

    return supports


def _flashinfer_fp8_block(device_type: str) -> Callable[[KernelRequest], Support]:
    common = _flashinfer_common(device_type)

    def supports(request: KernelRequest) -> Support:
        base = common(request)
        return base if not base else fp8_supports(request)

    return supports


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def flashinfer_kernel_specs(platform: str = "cuda", device_type: str = "cuda"
                            ) -> list[KernelSpec]:
    """The flashinfer adapters (attention, MLA, RMSNorm, fused add+RMSNorm) for ``platform``,
    whose tensors live on ``device_type`` (the test doubles register the same specs as
    ``flashinfer@cuda-double`` for a CPU-backed stand-in platform)."""
    table = [
        (ops.ATTENTION, "flashinfer_attention", "FlashInferAttention",
         _flashinfer_attention(device_type), FLASHINFER_PRIORITY,
         "flashinfer BatchPrefill/BatchDecode paged wrappers, NHD"),
        (ops.MLA_ATTENTION, "flashinfer_mla", "FlashInferMLA", _flashinfer_mla(device_type),
         FLASHINFER_MLA_PRIORITY,
         "flashinfer BatchMLAPagedAttentionWrapper absorbed decode (graph-safe); "
         "torch-native extend"),
        (ops.RMS_NORM, "flashinfer_norm", "rms_norm", _flashinfer_common(device_type),
         FLASHINFER_NORM_PRIORITY, "flashinfer rmsnorm"),
        (ops.FUSED_ADD_RMS_NORM, "flashinfer_norm", "fused_add_rms_norm",
         _flashinfer_common(device_type), FLASHINFER_NORM_PRIORITY,
         "flashinfer fused_add_rmsnorm, in place"),
        (ops.linear_op("fp8_block"), "flashinfer_fp8_block", "FlashInferFp8BlockLinear",
         _flashinfer_fp8_block(device_type), FLASHINFER_FP8_BLOCK_PRIORITY,
         "Triton fp8 GEMV for <= 4 rows, cuBLASLt block-scaled GEMM to 63, flashinfer's "
         "sm90 block-scale GEMM (DeepGEMM, nvcc-compiled per tile) for 64+ bf16 rows, "
         "in decode graphs too; the down projection's SiLU-and-mul writes its fp8 input"),
    ]
    name = "flashinfer" if platform == "cuda" else f"flashinfer@{platform}"
    return [KernelSpec(op=op, name=name, load=_lazy(module, attr), platforms=(platform,),
                       priority=priority, supports=supports, native_on=(platform,),
                       description=what)
            for op, module, attr, supports, priority, what in table]


def _attention_spec(name: str, attr: str, priority: int, description: str,
                    module: str = "sdpa_extend",
                    supports: Callable[[KernelRequest], Support] = attention_supports
                    ) -> KernelSpec:
    """A Triton-based attention backend of ``module`` (imports nothing)."""
    return KernelSpec(op=ops.ATTENTION, name=name, load=_lazy(module, attr),
                      platforms=PLATFORMS, priority=priority, supports=supports,
                      native_on=PLATFORMS, kv_cache_dtypes=KV_CACHE_DTYPES,
                      description=description)


def _flashinfer_extend_supports(request: KernelRequest) -> Support:
    """Triton's attention support, and flashinfer importable (its extends need it)."""
    why = flashinfer_missing()
    return Support.no(why) if why else attention_supports(request)


def flashinfer_extend_spec() -> KernelSpec:
    """Triton attention whose long extends run in flashinfer's paged prefill (imports
    nothing)."""
    return _attention_spec("triton_flashinfer_extend", "TritonAttentionFlashInferExtend",
                           FLASHINFER_EXTEND_PRIORITY,
                           "Triton decode and short extends; extends of 2048+ new tokens a "
                           "sequence through flashinfer's paged prefill (FA3 on sm90), "
                           "prefix and chunk in one call", module="flashinfer_extend",
                           supports=_flashinfer_extend_supports)


def sdpa_extend_spec() -> KernelSpec:
    """Triton attention whose long extends run in cuDNN's fused attention (imports nothing)."""
    return _attention_spec("triton_sdpa_extend", "TritonAttentionSDPAExtend",
                           SDPA_EXTEND_PRIORITY,
                           "Triton decode and short extends; extends of 2048+ new tokens a "
                           "sequence through cuDNN's attention (a cached prefix and the "
                           "chunk merged by log-sum-exp; flash for a prompt cuDNN refuses)")


@hookimpl
def heteroserve_platforms() -> list[CudaPlatform]:
    return [CudaPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for spec in (*triton_kernel_specs(PLATFORMS, TRITON_PRIORITY, PLATFORMS),
                 sdpa_extend_spec(), flashinfer_extend_spec(), *flashinfer_kernel_specs()):
        registry.register(spec)
