"""A CPU double of ``flashinfer.gemm.fp8_blockscale_gemm_sm90`` (flashinfer 0.7.4), the one
GEMM call heteroserve's cuda ``fp8_block`` linear makes.

Documented semantics (the function's docstring and its TensorRT-LLM runner,
``fp8_blockscale_gemm_sm90_binding.cu`` / ``fp8_blockscale_gemm_kernel.cuh``): ``input [M, K]``
bf16 is quantized per row and 128-column group to e4m3 (``q = fp8(x * 448 / amax)``, saturating;
``scale = amax / 448``, 1 for an all-zero group), ``weight [N, K]`` e4m3 carries
``weight_scale`` fp32 of ``(N, K / 128)`` (per row) or ``(ceil(N / 128), K / 128)`` (per
128x128 block); the product is accumulated in fp32 and written as ``[M, N]`` bf16 (or fp16).
A pre-quantized e4m3 ``input [M, K]`` (rows at a stride of ``K``) needs ``input_scale`` fp32:
the runner passes only its data pointer to the kernel, which reads the scale of row ``m`` and
group ``g`` at element ``g * ceil(M / 4) * 4 + m`` (the layout its own ``scale_1x128_kernel``
writes), whatever the tensor's shape and strides; the double reads that memory the same way.
Raises ``ValueError`` where the real function does: ``K % 128``, ``N % 64``, an fp8 input with a
bf16 weight, a missing or mis-shaped weight scale, a missing or non-fp32 input scale, an output
of another dtype or shape. The double stands for an sm90 device (the real function refuses any
other); bf16 weights (internal weight quantization) are not used by heteroserve and raise
``NotImplementedError``.
"""

from __future__ import annotations

import types

import torch

from heteroserve_vendor_doubles.dense import require

BLOCK = 128
E4M3_MAX = 448.0


def _quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Dequantized values of ``x``'s per-row, per-128-column e4m3 quantization (fp32)."""
    m, k = x.shape
    g = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = g.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, E4M3_MAX / amax, torch.ones_like(amax))
    q = (g * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() / scale).reshape(m, k)


def _dequantize_input(q: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of a pre-quantized ``q [M, K]``, its scales read from ``input_scale``'s
    memory as the kernel reads them (group-major, ``M`` padded to 4)."""
    m, k = q.shape
    pad = -(-m // 4) * 4
    need = (k // BLOCK) * pad
    require(input_scale.untyped_storage().nbytes() // 4 - input_scale.storage_offset() >= need,
            f"input_scale holds fewer than the {need} floats the kernel reads")
    flat = torch.as_strided(input_scale, (k // BLOCK, pad), (pad, 1))
    return (q.float().reshape(m, k // BLOCK, BLOCK) * flat[:, :m].t().unsqueeze(-1)).reshape(m, k)


def fp8_blockscale_gemm_sm90(input: torch.Tensor, weight: torch.Tensor,
                             input_scale: torch.Tensor | None = None,
                             weight_scale: torch.Tensor | None = None,
                             out: torch.Tensor | None = None,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``input [M, K] @ weight [N, K]^T`` as the module says; returns ``out`` (allocated
    when None)."""
    require(input.dim() == 2 and weight.dim() == 2, "input (M, K) and weight (N, K) are 2D")
    m, k = input.shape
    n = weight.shape[0]
    require(weight.shape[1] == k, f"K dimension mismatch: input has K={k}, weight has "
                                  f"K={weight.shape[1]}")
    require(k % BLOCK == 0, f"K dimension must be divisible by block size ({BLOCK}), got K={k}")
    require(n % 64 == 0, f"N dimension must be divisible by 64, got N={n}")
    require(input.stride(1) == 1 and (m < 2 or input.stride(0) == k),
            "the kernel reads the input's rows at a stride of K from its data pointer")
    fp8 = torch.float8_e4m3fn
    require(not (input.dtype == fp8 and weight.dtype == torch.bfloat16),
            "FP8 input + BF16 weight is not supported")
    if weight.dtype == torch.bfloat16:
        raise NotImplementedError("the double covers fp8 weights only")
    if input.dtype == fp8:
        require(input_scale is not None, "input_scale is required when input is FP8")
        require(input_scale.dtype == torch.float32,
                f"input_scale must be float32, got {input_scale.dtype}")
    else:
        require(input.dtype == torch.bfloat16,
                f"Input must be either FP8 or BF16, got {input.dtype}")
        require(input_scale is None, "input_scale should not be provided for BF16 inputs")
    require(weight.dtype == fp8, f"Weight must be either FP8 or BF16, got {weight.dtype}")
    require(weight_scale is not None, "weight_scale is required when weight is FP8")
    per_row, per_block = (n, k // BLOCK), (-(-n // BLOCK), k // BLOCK)
    require(tuple(weight_scale.shape) in (per_row, per_block),
            f"weight_scale shape mismatch. Expected either {per_row} or {per_block}, got "
            f"{tuple(weight_scale.shape)}")
    require(weight_scale.dtype == torch.float32,
            f"weight_scale must be float32, got {weight_scale.dtype}")
    if out is not None:
        require(tuple(out.shape) == (m, n), f"Output shape mismatch. Expected ({m}, {n})")
        require(out.dtype in (torch.bfloat16, torch.float16),
                f"Output dtype must be torch.bfloat16 or torch.float16, got {out.dtype}")
    else:
        out_dtype = out_dtype or torch.bfloat16
        require(out_dtype in (torch.bfloat16, torch.float16),
                f"Output dtype must be torch.bfloat16 or torch.float16, got {out_dtype}")
        out = torch.empty(m, n, dtype=out_dtype, device=input.device)
    rows = 1 if tuple(weight_scale.shape) == per_row else BLOCK
    w = weight.float() * weight_scale.repeat_interleave(rows, 0)[:n].repeat_interleave(BLOCK, 1)
    a = _dequantize_input(input, input_scale) if input.dtype == fp8 else _quantize_rows(input)
    out.copy_(a @ w.t())
    return out


def build() -> dict[str, types.ModuleType]:
    """``flashinfer.gemm`` with :func:`fp8_blockscale_gemm_sm90`."""
    gemm = types.ModuleType("flashinfer.gemm")
    gemm.fp8_blockscale_gemm_sm90 = fp8_blockscale_gemm_sm90
    gemm.__heteroserve_double__ = True
    return {"flashinfer.gemm": gemm}
