"""Repacking AWQ and GPTQ checkpoints into the layout :mod:`.w4a16_gemm` reads (torch, once
at load time)."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER

_SHIFTS = tuple(range(0, 32, 4))


def unpack_cols(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 ``[R, C/8]`` -> int64 ``[R, C]``: column ``8w + order[j]`` is nibble ``j`` of
    word ``w``."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=words.device)
    nib = (words.to(torch.int64)[..., None] >> shifts) & 0xF  # [R, C/8, 8], index j
    inverse = [order.index(c) for c in range(8)]
    return nib[..., inverse].reshape(words.shape[0], -1)


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R/8, C]`` -> int64 ``[R, C]``: row ``8w + j`` is nibble ``j`` of word ``w``."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=words.device)
    nib = (words.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF  # [R/8, 8, C]
    return nib.reshape(-1, words.shape[1])


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_rows` (rows padded with zeros to a multiple of 8)."""
    pad = (-q.shape[0]) % 8
    if pad:
        q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    words = (q.to(torch.int64).reshape(-1, 8, q.shape[1]) << shifts[None, :, None]).sum(dim=1)
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor,
               scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ ``(qweight [K, N/8], qzeros [G, N/8], scales [G, N])`` -> ``(qweight [ceil(K/8), N]
    int32, zeros [G, N] fp16, scales [G, N] fp16)``."""
    q = unpack_cols(qweight, AWQ_ORDER)
    zeros = unpack_cols(qzeros, AWQ_ORDER)
    return pack_rows(q).contiguous(), zeros.to(torch.float16).contiguous(), \
        scales.to(torch.float16).contiguous()


def repack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ v1 ``(qweight [K/8, N], qzeros [G, N/8], scales [G, N])`` -> the kernel layout;
    zero points become true zeros (stored + 1). With ``perm`` (int64 ``[K]``) the input rows
    are reordered: new row ``i`` is old row ``perm[i]``."""
    q = unpack_rows(qweight)
    if perm is not None:
        q = q.index_select(0, perm)
    zeros = unpack_cols(qzeros) + 1
    return pack_rows(q).contiguous(), zeros.to(torch.float16).contiguous(), \
        scales.to(torch.float16).contiguous()


def act_order_perm(g_idx: torch.Tensor, group: int, groups: int) -> torch.Tensor | None:
    """A row order that makes act-order groups contiguous and aligned (row ``i`` of the
    reordered weight is in group ``i // group``), or None when ``g_idx`` has no such order
    (some group does not hold exactly ``group`` rows). Costs one host sync, at load time."""
    g = g_idx.to(torch.int64)
    perm = torch.sort(g, stable=True).indices
    want = torch.arange(g.numel(), device=g.device) // group
    if g.numel() != group * groups or not torch.equal(g[perm], want):
        return None
    return perm


def random_packed(gen: torch.Generator, k: int, n: int, group: int, scale_max: float = 0.125
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random operands in the kernel layout, on the CPU: ``(words [ceil(K/8), N] int32 (every
    bit pattern), zeros [ceil(K/group), N] fp16 in 0..15, scales fp16 in [0.01, 0.01 +
    scale_max))`` (checks and tests of the 4-bit kernels)."""
    words = torch.randint(-2**31, 2**31, (-(-k // 8), n), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    groups = -(-k // group)
    zeros = torch.randint(0, 16, (groups, n), generator=gen).to(torch.float16)
    scales = (torch.rand(groups, n, generator=gen) * scale_max + 0.01).to(torch.float16)
    return words, zeros, scales
