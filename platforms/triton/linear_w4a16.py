"""W4A16 linear methods (AWQ, GPTQ v1 with optional act-order) on the Triton dequant-GEMM
(checkpoint layouts: ``core/kernels/linear.py``; kernel layout: :mod:`.w4a16_gemm`).

``process_weights_after_loading`` repacks both schemes into one layout: ``w4_qweight [K/8,
N]`` int32, ``w4_zeros`` / ``w4_scales`` ``[G, N]`` fp16. Act-order GPTQ whose groups all
hold ``group_size`` rows is turned into plain grouping by permuting the weight's input rows
once (``w4_perm``; ``apply`` gathers the activation columns in that order); any other
``g_idx`` is kept (``w4_g_idx``) and read per row by the kernel.

Up to :data:`~.w4a16_gemv.W4_GEMV_MAX_ROWS` rows (the decode step) go through
:func:`one_row_gemv` (nibbles unpacked in registers, bias fused, one launch: the
kernel and launch shape the device's ``w4_gemv_tuned`` table names, TMA-pipelined or
register-tile, else the register-tile kernel at its rule) on the same layout (layers that keep a ``g_idx`` use the GEMM); from :data:`W4_DEQUANT_MIN_ROWS`
rows the weight is dequantized in one pass (:func:`~.w4a16_dequant.w4a16_dequantize`) and
multiplied by the vendor BLAS; in between, the dequantizing GEMM.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from heteroserve.core.kernels.linear import LinearMethod
from heteroserve.platforms.triton.linear_params import drop_params, get_param, rows, set_param
from heteroserve.platforms.triton.w4a16_dequant import w4a16_dequantize
from heteroserve.platforms.triton.w4a16_gemm import w4a16_gemm
from heteroserve.platforms.triton.w4_gemv_tuned import tuned_gemv_config
from heteroserve.platforms.triton.w4a16_gemv import (
    W4_GEMV_MAX_ROWS, keeps_subnormals, nibble_decoding, w4a16_gemv,
)
from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, w4a16_gemv_tma
from heteroserve.platforms.triton.w4a16_pack import act_order_perm, repack_awq, repack_gptq

#: Rows from which ``apply`` dequantizes the weight and calls the BLAS GEMM instead of the
#: dequantizing Triton GEMM. ``benchmarks/w4_gemm_sweep.py`` on an H100 (2026-12-05,
#: ``results/h100-20261205-2138-w4_gemm.json``), Llama-3.1-8B's four layers together: 313 vs
#: 363 us at 64 rows (Triton ahead), 380 vs 381 us at 128, 672 vs 404 us at 256 (the GEMM's
#: 128-row tiles double there), 3.3x at 1024; the BLAS path stays within 12 % of bf16 from
#: 1024 rows up. The dequantized weight is a transient ``[K, N]`` buffer in the activation
#: dtype (235 MB for Llama-3.1-8B's gate_up), taken from the memory the KV pool leaves
#: (``--mem-fraction-static``) and freed after the product.
W4_DEQUANT_MIN_ROWS = 128


def one_row_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                 scales: torch.Tensor, group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The decode-size product (:func:`~.w4a16_gemv.w4a16_gemv`'s contract) at the kernel
    and launch shape the device's table names for this shape
    (:func:`~.w4_gemv_tuned.tuned_gemv_config`), else the register-tile GEMV at its rule;
    with the device's nibble decoding either way."""
    cfg = tuned_gemv_config(qweight.shape[1], x.shape[1], group, x.device)
    if cfg is None:
        return w4a16_gemv(x, qweight, zeros, scales, group, bias)
    cfg = replace(cfg, nibble=nibble_decoding(x.device))
    if isinstance(cfg, W4TmaConfig):
        return w4a16_gemv_tma(x, qweight, zeros, scales, group, cfg, bias)
    return w4a16_gemv(x, qweight, zeros, scales, group, bias, config=cfg)


class _W4A16Linear(LinearMethod):
    """Shared ``apply`` over the repacked layout."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        qweight, zeros = get_param(layer, "w4_qweight"), get_param(layer, "w4_zeros")
        scales = get_param(layer, "w4_scales")
        k = int(getattr(layer, "w4_in_features"))
        x2 = rows(x, k, self.scheme)
        perm = getattr(layer, "w4_perm", None)
        if perm is not None:
            x2 = x2.index_select(1, perm)
        g_idx = getattr(layer, "w4_g_idx", None)
        group = k // zeros.shape[0] if g_idx is None else k
        if g_idx is None and x2.shape[0] <= W4_GEMV_MAX_ROWS:
            y = one_row_gemv(x2, qweight, zeros, scales, group, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if x2.shape[0] >= W4_DEQUANT_MIN_ROWS:
            w = w4a16_dequantize(qweight, zeros, scales, k, group, g_idx, x2.dtype)
            y = torch.mm(x2, w) if bias is None else torch.addmm(bias.to(x2.dtype), x2, w)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        y = w4a16_gemm(x2, qweight, zeros, scales, group, g_idx)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _store(layer: torch.nn.Module, k: int, packed: tuple[torch.Tensor, ...],
               perm: torch.Tensor | None, g_idx: torch.Tensor | None) -> None:
        drop_params(layer, "qweight", "qzeros", "scales", "g_idx")
        keeps_subnormals(packed[0].device)  # once per device, outside graph capture
        for name, t in zip(("w4_qweight", "w4_zeros", "w4_scales"), packed):
            set_param(layer, name, t)
        layer.w4_in_features = k
        if perm is not None:
            set_param(layer, "w4_perm", perm)
        if g_idx is not None:
            set_param(layer, "w4_g_idx", g_idx.to(torch.int32).contiguous())


class AwqW4A16Linear(_W4A16Linear):
    """AWQ 4-bit weights (fp16 scales, per-group zero points); activations unquantized."""

    scheme = "awq_w4a16"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qweight, qzeros = get_param(layer, "qweight"), get_param(layer, "qzeros")
        scales = get_param(layer, "scales")
        k, groups = qweight.shape[0], qzeros.shape[0]
        if groups == 0 or k % groups or (k // groups) % 16:
            raise ValueError(f"awq_w4a16: {k} input rows in {groups} groups (group size must "
                             "be a multiple of 16)")
        self._store(layer, k, repack_awq(qweight, qzeros, scales), None, None)


class GptqW4A16Linear(_W4A16Linear):
    """GPTQ (v1 zero points) 4-bit weights, optional act-order ``g_idx``; activations
    unquantized."""

    scheme = "gptq_w4a16"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        qweight, qzeros = get_param(layer, "qweight"), get_param(layer, "qzeros")
        scales = get_param(layer, "scales")
        k, groups = qweight.shape[0] * 8, qzeros.shape[0]
        if groups == 0 or k % groups:
            raise ValueError(f"gptq_w4a16: {k} input rows do not split into {groups} groups")
        group = k // groups
        g_idx = getattr(layer, "g_idx", None)
        perm = keep_g_idx = None
        if isinstance(g_idx, torch.Tensor):
            if g_idx.shape != (k,):
                raise ValueError(f"gptq_w4a16: g_idx must have shape [{k}], got "
                                 f"{tuple(g_idx.shape)}")
            trivial = torch.arange(k, device=g_idx.device) // group
            if not torch.equal(g_idx.to(torch.int64), trivial):
                perm = act_order_perm(g_idx, group, groups)
                keep_g_idx = g_idx if perm is None else None
        if keep_g_idx is None and group % 16:
            raise ValueError(f"gptq_w4a16: group size {group} must be a multiple of 16")
        self._store(layer, k, repack_gptq(qweight, qzeros, scales, perm), perm, keep_g_idx)
