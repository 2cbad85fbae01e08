"""Function ops on Intel GPUs through ``intel_extension_for_pytorch.llm.functional`` (each
follows its contract in ``core/kernels/ops.py``; the IPEX call is in the docstring)."""

from __future__ import annotations

import torch
from intel_extension_for_pytorch.llm import functional as ipex_f


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``ipex.llm.functional.rms_norm(hidden_states [T, H], weight [H], eps)``."""
    return ipex_f.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipex.llm.functional.add_rms_norm(residual, x, weight, bias=None, eps,
    add_back=True)``: returns ``rms_norm(x + residual)`` and, with ``add_back``, stores
    ``x + residual`` into ``residual`` (in place, as the contract allows)."""
    out = ipex_f.add_rms_norm(residual, x, weight, None, eps, True)
    return out, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``ipex.llm.functional.silu_mul(x=gate [T, I], y=up [T, I], out [T, I])``."""
    half = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], half, dtype=x.dtype, device=x.device)
    ipex_f.silu_mul(x[..., :half], x[..., half:], out)
    return out


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``ipex.llm.functional.gelu_mul(x=gate, y=up, out, approximate)``."""
    half = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], half, dtype=x.dtype, device=x.device)
    ipex_f.gelu_mul(x[..., :half], x[..., half:], out, approximate)
    return out


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipex.llm.functional.rotary_embedding(query [T, Hq, D], key [T, Hk, D], sin [T, R],
    cos [T, R], rotary_dim=R, rotary_half=is_neox)``: ``sin``/``cos`` are per-token rows at
    full rotary width (halves repeated for NeoX, each value repeated twice for GPT-J, the
    Hugging Face convention); dims past ``R`` pass through."""
    rot = cos_sin_cache.shape[1]
    cs = cos_sin_cache.index_select(0, positions.to(torch.long))
    cos, sin = cs[:, : rot // 2], cs[:, rot // 2:]
    if is_neox:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    else:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return ipex_f.rotary_embedding(q, k, sin.to(q.dtype), cos.to(q.dtype), rot, is_neox)
