"""Dynamic symmetric activation quantization for the W8A8 schemes (Triton kernels).

Per (row, ``group``-column group): ``s = max(amax / qmax, 1e-12)``, ``q = clamp(x / s, -qmax,
qmax)`` rounded to the output dtype (fp8: the cast's round-to-nearest-even; int8: nearest,
ties to even). ``group = K`` gives per-token scales; a given scale (``STATIC``) skips the amax
pass (per-tensor quantization with a precomputed scale), and so does a given amax
(``FROM_AMAX``: per-tensor with the scale computed from the tensor's amax in the kernel, which
saves the launches of computing it in torch). Dynamic scales of a power-of-two group take
:func:`_group_quant_kernel` (several groups a program, one load). A gated input (``GATED``:
``x = [gate | up]``) is quantized as ``silu(gate) * up`` rounded to ``x``'s dtype first, as
the SiLU-and-mul op rounds it, without writing that product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import gate_activation

MIN_SCALE = 1e-12
#: 1.5 * 2**23: adding and subtracting it rounds an fp32 of magnitude < 2**22 to an integer,
#: ties to even (the FPU's rounding mode), on every backend and in the interpreter.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _load_cols(x_ptr, row_ptr, cols, mask, K, GATED: tl.constexpr):
    """fp32 ``x[row, cols]``, or with ``GATED`` ``silu(x[row, cols]) * x[row, K + cols]``
    rounded to ``x``'s dtype (``row_ptr``: the row's first element)."""
    x = tl.load(row_ptr + cols, mask=mask, other=0.0)
    if GATED:
        up = tl.load(row_ptr + K + cols, mask=mask, other=0.0).to(tl.float32)
        x = (gate_activation(x.to(tl.float32), "silu") * up).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, s_ptr, amax_ptr, stride_xm, stride_qm, stride_sm, stride_sg, K, group, qmax,
    min_scale, IS_INT: tl.constexpr, STATIC: tl.constexpr, FROM_AMAX: tl.constexpr,
    GATED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lo = g * group
    hi = tl.minimum(lo + group, K)
    if STATIC:
        scale = tl.load(s_ptr)
    elif FROM_AMAX:
        scale = tl.maximum(tl.load(amax_ptr) / qmax, min_scale)
        if (row == 0) & (g == 0):
            tl.store(s_ptr, scale)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(lo, hi, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = _load_cols(x_ptr, x_ptr + row * stride_xm, cols, cols < hi, K, GATED)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / qmax, min_scale)
        tl.store(s_ptr + row * stride_sm + g * stride_sg, scale)
    for off in range(lo, hi, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < hi
        x = _load_cols(x_ptr, x_ptr + row * stride_xm, cols, m, K, GATED)
        v = tl.minimum(tl.maximum(x / scale, -qmax), qmax)
        if IS_INT:
            v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
        tl.store(q_ptr + row * stride_qm + cols, v.to(q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, stride_sm, stride_sg, K, n_groups, qmax,
    min_scale, IS_INT: tl.constexpr, GATED: tl.constexpr, GROUP: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
):
    """Dynamic per-group scales for a power-of-two ``GROUP``: one program quantizes
    ``GROUPS_PER_PROGRAM`` groups of a row from one load (no second pass over ``x``)."""
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = cols < K
    x = _load_cols(x_ptr, x_ptr + row * stride_xm, cols, m, K, GATED)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / qmax, min_scale)
    tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups < n_groups)
    v = tl.minimum(tl.maximum(x / scale[:, None], -qmax), qmax)
    if IS_INT:
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    tl.store(q_ptr + row * stride_qm + cols, v.to(q_ptr.dtype.element_ty), mask=m)


#: elements of a row :func:`_group_quant_kernel` quantizes per program
_GROUP_PROGRAM_ELEMENTS = 2048


def quantize_rows(x: torch.Tensor, out_dtype: torch.dtype, qmax: float, group: int | None,
                  scale: torch.Tensor | None = None, group_major: bool = False,
                  row_multiple: int = 1, amax: torch.Tensor | None = None,
                  gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [M, K]`` (last dim contiguous) to ``out_dtype``; with ``gated``, quantize
    ``silu(gate) * up`` of ``x [M, 2K] = [gate | up]`` (rounded to ``x.dtype``, never written).

    ``group``: columns per scale (``None``: the whole row). ``scale``: a precomputed fp32
    scale of one element (per-tensor); then ``group`` is ignored. ``amax``: instead of
    ``scale``, the fp32 absolute maximum of ``x`` (one element, e.g. from
    ``torch.linalg.vector_norm(x, inf)``); the per-tensor scale ``max(amax / qmax, 1e-12)`` is
    computed in the kernel and returned as a fresh ``s [1]``. Returns ``(q [M, K], s)``
    with ``s`` fp32 ``[M, ceil(K / group)]`` (or ``scale`` itself), row-major, or with
    ``group_major`` stored group by group (strides ``(1, M)``, what cuBLASLt's 1x128 block
    scaling reads). ``row_multiple``: ``q`` and ``s`` get ``ceil(M / row_multiple) *
    row_multiple`` rows, those past ``M`` left unwritten (cuBLASLt wants 16-byte aligned scale
    strides); callers use only the first ``M`` rows of what they compute from them. Raises
    ``ValueError`` for ``gated`` with ``amax`` (that amax would be the product's) or an odd
    width."""
    m, k = x.shape
    if gated:
        if amax is not None or k % 2:
            raise ValueError(f"quantize_rows: gated takes [gate | up] of even width and no "
                             f"amax, got width {k}{' and an amax' if amax is not None else ''}")
        k //= 2
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = triton.cdiv(m, row_multiple) * row_multiple
    q = torch.empty((rows, k), dtype=out_dtype, device=x.device)
    per_tensor = scale is not None or amax is not None
    g = k if (group is None or per_tensor) else group
    groups = max(1, triton.cdiv(k, g))
    if scale is not None:
        s = scale
    elif amax is not None:
        s = torch.empty(1, dtype=torch.float32, device=x.device)
    elif group_major:
        s = torch.empty((groups, rows), dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if m and k and not per_tensor and g == triton.next_power_of_2(g) and groups > 1:
        per_program = max(1, min(_GROUP_PROGRAM_ELEMENTS // g, triton.next_power_of_2(groups)))
        _group_quant_kernel[(m, triton.cdiv(groups, per_program))](
            x, q, s, x.stride(0), q.stride(0), s.stride(0), s.stride(1), k, groups, float(qmax),
            MIN_SCALE, IS_INT=not out_dtype.is_floating_point, GATED=gated, GROUP=g,
            GROUPS_PER_PROGRAM=per_program, num_warps=4)
    elif m and k:
        block = min(1024, triton.next_power_of_2(g)) if x.device.type != "cpu" else 32
        _quant_kernel[(m, groups)](
            x, q, s, amax if amax is not None else s, x.stride(0), q.stride(0),
            0 if per_tensor else s.stride(0), 0 if per_tensor else s.stride(1), k, g,
            float(qmax), MIN_SCALE, IS_INT=not out_dtype.is_floating_point,
            STATIC=scale is not None, FROM_AMAX=scale is None and amax is not None,
            GATED=gated, BLOCK=block, num_warps=4)
    elif amax is not None:  # no rows: the scale still has its value
        s = (amax.reshape(1).to(torch.float32) / qmax).clamp(min=MIN_SCALE)
    return q, s
