"""What the host CPU and this torch build offer the cpu platform's kernels.

Detected once per process: the instruction sets the CPU advertises (``/proc/cpuinfo`` flags
on Linux, torch's own dispatch level everywhere), whether torch was built with oneDNN and
MKL, and the dtypes oneDNN runs natively here. The linear methods read it to decide whether
to prepack weights; the start-up block shows it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def _cpu_flags() -> frozenset[str]:
    """Flags of the first processor in ``/proc/cpuinfo``; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class CpuFeatures:
    """``isa``: torch's CPU dispatch level (``AVX512``, ``AVX2``, ``DEFAULT``...).
    ``avx512``/``avx512_bf16``/``amx_bf16``: what the CPU advertises. ``onednn``/``mkl``:
    built into torch and usable. ``onednn_bf16``/``onednn_fp16``: oneDNN runs that dtype
    natively (AVX512-BF16/AMX, AVX512-FP16/AMX-FP16), else it would emulate it slowly."""

    isa: str
    avx512: bool
    avx512_bf16: bool
    amx_bf16: bool
    onednn: bool
    mkl: bool
    onednn_bf16: bool
    onednn_fp16: bool

    def prepack_dtypes(self) -> tuple[torch.dtype, ...]:
        """Weight dtypes the unquantized linear method prepacks for oneDNN."""
        if not self.onednn:
            return ()
        dtypes = [torch.float32]
        if self.onednn_bf16:
            dtypes.append(torch.bfloat16)
        if self.onednn_fp16:
            dtypes.append(torch.float16)
        return tuple(dtypes)

    def describe(self) -> dict[str, str]:
        """One-line-per-feature summary for the start-up block and benchmark reports."""
        matmul = "AMX" if self.amx_bf16 else "AVX512-BF16" if self.avx512_bf16 else \
            "AVX512" if self.avx512 else self.isa
        packed = ",".join(str(d).removeprefix("torch.") for d in self.prepack_dtypes())
        return {"isa": self.isa, "matmul_units": matmul,
                "onednn_prepack": packed or "off (torch built without oneDNN)"}


@functools.cache
def detect_cpu_features() -> CpuFeatures:
    flags = _cpu_flags()
    onednn = torch.backends.mkldnn.is_available()
    return CpuFeatures(
        isa=torch.backends.cpu.get_cpu_capability(),
        avx512="avx512f" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        onednn=onednn,
        mkl=torch.backends.mkl.is_available(),
        onednn_bf16=onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        onednn_fp16=onednn and torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    )
