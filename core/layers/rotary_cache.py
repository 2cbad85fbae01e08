"""The rotary-embedding cos/sin cache, computed by the core and applied by the rotary kernel.

The cache is hardware-neutral data: ``[max_position, R]`` holding ``[cos | sin]`` of the
``R/2`` rotary frequencies at every position, with any context-extension scaling already
folded in. The semantics follow Hugging Face transformers' ``modeling_rope_utils`` exactly
(inverse frequencies in fp32, positions times frequencies in fp32), so a model served here
rotates exactly as the reference implementation does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """``1 / base^(2i/R)`` for ``i < R/2``, fp32, as transformers computes it."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    return 1.0 / (base ** exponents)


def _require(params: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}")
    return params[key]


def _llama3_inv_freq(inv_freq: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend
    in between (wavelength bounds ``original_max_position_embeddings / {low,high}_freq_factor``)."""
    factor = float(_require(params, "factor", "llama3"))
    low = float(_require(params, "low_freq_factor", "llama3"))
    high = float(_require(params, "high_freq_factor", "llama3"))
    old_len = float(_require(params, "original_max_position_embeddings", "llama3"))
    if high <= low:
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rotary_dim: int, base: float, max_position: int,
                   params: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (NTK-by-parts interpolation plus attention factor), transformers' semantics.
    Returns ``(inv_freq, attention_factor)``; the factor multiplies cos and sin."""
    old_len = int(_require(params, "original_max_position_embeddings", "yarn"))
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_position / old_len
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).to(torch.float32) / rotary_dim)
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, float(attention_factor)


def rope_type_of(rope_scaling: Mapping[str, Any] | None) -> str:
    """The rope type named by a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict
    (key ``rope_type``, legacy ``type``); ``"default"`` when absent."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def build_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                        rope_scaling: Mapping[str, Any] | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[max_position, rotary_dim]`` cache ``[cos | sin]`` on the CPU, in ``dtype``.

    ``rotary_dim`` (even) is the number of rotated dims per head (``head_dim *
    partial_rotary_factor``); ``base`` is ``rope_theta``; ``rope_scaling`` is the model
    config's dict (types: default, linear, llama3, yarn; keys as transformers names them).
    Row ``p`` holds ``cos(p * f_i)`` then ``sin(p * f_i)`` for the ``rotary_dim / 2``
    inverse frequencies ``f_i`` (YaRN additionally multiplies both by its attention factor).
    Move the result to the device once; the rotary kernel indexes it by position.

    Errors: odd or non-positive ``rotary_dim``, non-positive ``max_position`` or ``base``, an
    unknown rope type, or a missing scaling key raise ``ValueError``.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    if base <= 0:
        raise ValueError(f"rope base (rope_theta) must be positive, got {base}")
    rope_type = rope_type_of(rope_scaling)
    params: Mapping[str, Any] = rope_scaling or {}
    attention_factor = 1.0
    if rope_type == "default":
        inv_freq = _base_inv_freq(rotary_dim, base)
    elif rope_type == "linear":
        inv_freq = _base_inv_freq(rotary_dim, base) / float(_require(params, "factor", "linear"))
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(_base_inv_freq(rotary_dim, base), params)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(rotary_dim, base, max_position, params)
    else:
        raise ValueError(f"unsupported rope type {rope_type!r} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(torch.float32))
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    if attention_factor != 1.0:
        cache = cache * attention_factor
    return cache.to(dtype)
