"""Linear-method oracles: dequantize checkpoint tensors by each scheme's definition and apply
``x @ W^T + bias`` in float64, including the dynamic activation quantization of W8A8 schemes."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, FP8_BLOCK


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[...]`` -> int64 ``[..., 8]``: nibble ``j`` is ``(word >> 4j) & 15``."""
    w = words.cpu().to(torch.int64) & 0xFFFFFFFF
    return (w[..., None] >> torch.arange(0, 32, 4)) & 0xF


def _expand_blocks(scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    full = scales.double().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return full[:n, :k]


def dequantize(scheme: str, p: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """Float64 ``W [N, K]`` from scheme ``scheme``'s checkpoint tensors ``p``."""
    p = {name: t.cpu() for name, t in p.items()}
    if scheme == "unquantized":
        return p["weight"].double()
    if scheme in ("fp8_per_tensor", "fp8_per_channel"):
        return p["weight"].double() * p["weight_scale"].double()
    if scheme == "fp8_block":
        n, k = p["weight"].shape
        return p["weight"].double() * _expand_blocks(p["weight_scale_inv"], n, k)
    if scheme == "int8_w8a8":
        return p["weight"].double() * p["weight_scale"].double()
    if scheme == "awq_w4a16":
        nib = unpack_nibbles(p["qweight"])  # [K, N/8, 8], nibble j = column AWQ_ORDER[j]
        inverse = [AWQ_ORDER.index(c) for c in range(8)]
        q = nib[..., inverse].reshape(nib.shape[0], -1).double()
        z = unpack_nibbles(p["qzeros"])[..., inverse].reshape(p["qzeros"].shape[0], -1).double()
        groups = torch.arange(q.shape[0]) // group_size
        return ((q - z[groups]) * p["scales"].double()[groups]).T
    if scheme == "gptq_w4a16":
        nib = unpack_nibbles(p["qweight"])  # [K/8, N, 8], nibble j = row 8w + j
        q = nib.permute(0, 2, 1).reshape(-1, nib.shape[1]).double()
        z = unpack_nibbles(p["qzeros"]).reshape(p["qzeros"].shape[0], -1).double() + 1
        groups = p["g_idx"].long() if "g_idx" in p else torch.arange(q.shape[0]) // group_size
        return ((q - z[groups]) * p["scales"].double()[groups]).T
    raise ValueError(f"unknown linear scheme {scheme!r}")


def _fp8_round(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    m = float(torch.finfo(fp8_dtype).max)
    return x.clamp(-m, m).to(fp8_dtype).double()


def quantize_activations(scheme: str, x: torch.Tensor,
                         fp8_dtype: torch.dtype | None) -> torch.Tensor:
    """The float64 values a W8A8 scheme's dynamic activation quantization produces from ``x
    [T, K]`` (identity for weight-only schemes): per tensor (fp8_per_tensor), per token and
    128-column group (fp8_block), per token fp8 (fp8_per_channel), per token symmetric int8 (int8_w8a8); scale = amax / max."""
    x = x.double().cpu()
    if scheme in ("fp8_per_tensor", "fp8_per_channel", "fp8_block"):
        assert fp8_dtype is not None, f"{scheme} needs the platform's fp8 dtype"
        m = float(torch.finfo(fp8_dtype).max)
        if scheme == "fp8_per_tensor":
            s = x.abs().max().clamp(min=1e-12) / m
            return _fp8_round(x / s, fp8_dtype) * s
        if scheme == "fp8_per_channel":
            s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / m
            return _fp8_round(x / s, fp8_dtype) * s
        out = torch.empty_like(x)
        for j in range(0, x.shape[1], FP8_BLOCK):
            g = x[:, j:j + FP8_BLOCK]
            s = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / m
            out[:, j:j + FP8_BLOCK] = _fp8_round(g / s, fp8_dtype) * s
        return out
    if scheme == "int8_w8a8":
        s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        return torch.round(x / s).clamp(-127, 127) * s
    return x


def linear(scheme: str, x: torch.Tensor, params: dict[str, torch.Tensor], group_size: int,
           bias: torch.Tensor | None, fp8_dtype: torch.dtype | None) -> torch.Tensor:
    """Float64 ``quantize_activations(x) @ dequantize(params)^T (+ bias)`` for ``x [T, K]``."""
    w = dequantize(scheme, params, group_size)
    y = quantize_activations(scheme, x, fp8_dtype) @ w.T
    return y if bias is None else y + bias.double().cpu()
