"""Torch-native rotary position embedding (contract: ``RotaryOp`` in ``core/kernels/ops.py``).

The cos/sin cache comes from :func:`heteroserve.core.layers.rotary_cache.build_cos_sin_cache`.
"""

from __future__ import annotations

import weakref

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the first ``R = 2 * cos.shape[-1]`` dims of ``x [T, H, D]`` into a new tensor,
    in ``x.dtype`` (``cos``/``sin`` ``[T, 1, R/2]`` already in it); the rest is copied."""
    rot_dim = 2 * cos.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rot_dim < x.shape[-1]:
        out[..., rot_dim:] = x[..., rot_dim:]
    if is_neox:
        half = rot_dim // 2
        x1, x2 = x[..., :half], x[..., half:rot_dim]
        o1, o2 = out[..., :half], out[..., half:rot_dim]
    else:
        x1, x2 = x[..., 0:rot_dim:2], x[..., 1:rot_dim:2]
        o1, o2 = out[..., 0:rot_dim:2], out[..., 1:rot_dim:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool
             ) -> torch.Tensor:
    """:func:`_rotate` in functional form (no ``out=`` views, no in-place products), the
    form a ``torch.compile`` trace fuses into one loop; the same values to one rounding."""
    rot_dim = 2 * cos.shape[-1]
    xr = x[..., :rot_dim]
    if is_neox:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x[..., rot_dim:]], dim=-1) if rot_dim < x.shape[-1] else out


class _CosSinMemo:
    """The last lookup's ``(cos, sin)``: every layer of a forward rotates at the same
    ``positions`` with the same (shared) cache, so the gather and cast run once a forward.
    A hit needs the very same ``positions`` and cache objects (weakly referenced: the memo
    keeps neither alive), the same dtype, and positions equal to those of the lookup (an
    in-place update of a reused positions buffer misses; inference tensors have no version
    counter to tell). Host tensors only: the comparison would wait for a device."""

    def __init__(self) -> None:
        self._positions: weakref.ref[torch.Tensor] | None = None
        self._cache: weakref.ref[torch.Tensor] | None = None
        self._dtype: torch.dtype | None = None
        self._seen = torch.empty(0)
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, positions: torch.Tensor, cache: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, 1, R/2]`` in ``dtype``."""
        if (self._value is not None and dtype == self._dtype and self._positions is not None
                and self._positions() is positions and self._cache is not None
                and self._cache() is cache and torch.equal(self._seen, positions)):
            return self._value
        cos_sin = cache.index_select(0, positions.to(torch.long)).to(dtype).unsqueeze(1)
        cos, sin = cos_sin.chunk(2, dim=-1)
        if positions.device.type == "cpu":
            self._positions, self._cache = weakref.ref(positions), weakref.ref(cache)
            self._dtype, self._seen, self._value = dtype, positions.clone(), (cos, sin)
        return cos, sin


_MEMO = _CosSinMemo()


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``k``'s heads directly follow ``q``'s in one storage with the same token stride
    (q and k split from one fused projection output), so that ``[T, Hq + Hk, D]`` views both.
    Two allocations that merely lie next to each other do not qualify."""
    heads, d = q.shape[1] + k.shape[1], q.shape[2]
    rows_ok = q.shape[0] == 1 or (q.stride(0) == k.stride(0) and q.stride(0) >= heads * d)
    return (q.dtype == k.dtype and rows_ok and q.stride()[1:] == k.stride()[1:] == (d, 1)
            and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            and k.data_ptr() == q.data_ptr() + q.shape[1] * d * q.element_size())


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` at ``positions`` (int ``[T]``).

    ``cos_sin_cache [max_position, R]`` holds ``[cos | sin]``; only the first ``R <= D`` dims
    of each head rotate (NeoX halves when ``is_neox``, else GPT-J interleaved pairs), the
    rest pass through. Returns new ``(q, k)`` in the input dtypes, computed in them (cos/sin
    rounded to it, as Hugging Face does); inputs (any strides) are not modified. When ``k``'s
    heads follow ``q``'s in memory (one fused projection's output), both are rotated in one
    pass and returned as head slices of one new ``[T, Hq + Hk, D]`` tensor (last two dims
    contiguous); otherwise each is a new contiguous tensor. Raises ``ValueError`` on
    inconsistent shapes (positions are not range-checked, to avoid a host sync).
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [T, H, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > q.shape[-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rotary: cache width {rot_dim} must be even and <= head size "
                         f"{q.shape[-1]} (k head size {k.shape[-1]})")
    if positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"rotary: positions {tuple(positions.shape)}, q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)} disagree on the token count")
    if torch.compiler.is_compiling():  # no memo, no storage checks: plain tensor math
        cos, sin = cos_sin_cache.index_select(0, positions.to(torch.long)).unsqueeze(1).chunk(2, -1)
        return (_rotated(q, cos.to(q.dtype), sin.to(q.dtype), is_neox),
                _rotated(k, cos.to(k.dtype), sin.to(k.dtype), is_neox))
    cos, sin = _MEMO.get(positions, cos_sin_cache, q.dtype)
    if _adjacent_heads(q, k):
        hq = q.shape[1]
        both = q.as_strided((q.shape[0], hq + k.shape[1], q.shape[2]),
                           (max(q.stride(0), (hq + k.shape[1]) * q.shape[2]), *q.stride()[1:]))
        out = _rotate(both, cos, sin, is_neox)
        return out[:, :hq], out[:, hq:]
    if k.dtype != q.dtype:
        return _rotate(q, cos, sin, is_neox), _rotate(k, cos.to(k.dtype), sin.to(k.dtype), is_neox)
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)
