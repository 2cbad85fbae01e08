"""Per-layer head-major copies of the running decode batch's K/V, kept across decode steps.

A decode step attends every sequence of the batch over its whole cache. Gathering those K/V
rows out of the paged pool every step and every layer costs as much as the attention itself
on a host CPU, although from one decode step to the next each sequence gains one token and
nothing else changes. :class:`DecodeKVMirror` keeps, per layer, ``[B, Hk, L, D]`` buffers
(contiguous per head, what SDPA reads fastest) that hold the previous step's gather, and
refreshes only the positions whose slot changed or was written this step.

Invariant it relies on (the engine's): between two decode steps the caches change only at the
slots ``write_kv`` stores (``meta.out_cache_loc``), and an extend step resets the mirror
(prefill may reuse freed slots anywhere). Steps are announced with :meth:`begin_step` by the
backend's ``prepare``; a decode call that was not announced does not use the mirror.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MirrorUpdate:
    """Positions to refresh this step: int64 ``[n]`` batch ``rows``, ``positions`` and the
    ``slots`` they read. ``None`` fields never occur; a full refresh is ``update is None``."""

    rows: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor


@dataclass
class _LayerMirror:
    k: torch.Tensor  # [Bcap, Hk, Lcap, D]
    v: torch.Tensor
    epoch: int
    caches: tuple[int, int]  # data_ptr of the K and V caches it mirrors


class DecodeKVMirror:
    """The mirrors of every layer, at most ``budget_bytes`` in all (a layer that does not
    fit gets ``None`` from :meth:`kv` and gathers per step instead)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._layers: dict[int, _LayerMirror] = {}
        self._table: torch.Tensor | None = None
        self._epoch = 0
        self._update: MirrorUpdate | None = None
        self._active = False

    def reset(self) -> None:
        """Forget the previous table: the next decode step refreshes every layer fully."""
        self._table = None
        self._active = False

    def begin_step(self, table: torch.Tensor, written: torch.Tensor) -> None:
        """Announce a decode step. ``table`` int64 ``[B, L]``: slot of position ``p`` of
        sequence ``b`` (padding repeats a valid slot of the row); ``written``: the slots
        ``write_kv`` stores in this step. Computes once what every layer refreshes."""
        prev, self._table = self._table, table
        self._epoch += 1
        self._active = True
        self._update = None
        if prev is None:
            return
        bsz, width = table.shape
        old = torch.full_like(table, -1)
        rows, cols = min(bsz, prev.shape[0]), min(width, prev.shape[1])
        old[:rows, :cols] = prev[:rows, :cols]
        changed = (table != old) | torch.isin(table, written.to(table.dtype))
        rows_idx, pos_idx = changed.nonzero(as_tuple=True)
        if rows_idx.numel() * 2 > table.numel():
            return  # most of the batch changed: a full gather is cheaper
        self._update = MirrorUpdate(rows_idx, pos_idx, table[rows_idx, pos_idx])

    @property
    def planned_refresh(self) -> int | None:
        """How many positions each layer refreshes this step (None: a full gather)."""
        return None if self._update is None else int(self._update.rows.numel())

    @property
    def active(self) -> bool:
        """Whether the current step was announced (:meth:`kv` may be used)."""
        return self._active

    def kv(self, layer_id: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's ``[B, Hk, L, D]`` K and V of layer ``layer_id`` in ``dtype`` (views of
        the mirror, valid until the next step), from contiguous NHD caches ``[pages,
        page_size, Hk, D]``; None when the mirror would exceed the budget."""
        table = self._table
        assert table is not None and self._active
        bsz, width = table.shape
        hk, d = k_cache.shape[2], k_cache.shape[3]
        keyed = (k_cache.data_ptr(), v_cache.data_ptr())
        m = self._layers.get(layer_id)
        fits = (m is not None and m.k.dtype == dtype and m.caches == keyed
                and m.k.shape[0] >= bsz and m.k.shape[2] >= width and m.k.shape[1] == hk)
        if not fits:
            m = self._allocate(layer_id, bsz, width, hk, d, dtype, keyed, m)
            if m is None:
                return None
        flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
        upd = self._update
        if fits and upd is not None and m.epoch == self._epoch - 1:
            if upd.rows.numel():
                m.k[upd.rows, :, upd.positions] = flat_k.index_select(0, upd.slots).to(dtype)
                m.v[upd.rows, :, upd.positions] = flat_v.index_select(0, upd.slots).to(dtype)
        else:
            idx = table.reshape(-1)
            for buf, flat in ((m.k, flat_k), (m.v, flat_v)):
                rows = flat.index_select(0, idx).view(bsz, width, hk, d)
                buf[:bsz, :, :width].copy_(rows.permute(0, 2, 1, 3))
        m.epoch = self._epoch
        return m.k[:bsz, :, :width], m.v[:bsz, :, :width]

    def _allocate(self, layer_id: int, bsz: int, width: int, hk: int, d: int,
                  dtype: torch.dtype, keyed: tuple[int, int], old: _LayerMirror | None
                  ) -> _LayerMirror | None:
        """A (grown) mirror for the layer, or None (and the layer's mirror dropped) when it
        does not fit the budget. Contexts grow a token a step: the width grows by half."""
        self._layers.pop(layer_id, None)
        if old is not None and old.k.dtype == dtype and old.k.shape[1] == hk:
            bsz = max(bsz, old.k.shape[0])
            width = max(width, old.k.shape[2] * 3 // 2)
        width = -(-width // 16) * 16
        need = 2 * bsz * hk * width * d * dtype.itemsize
        used = sum(2 * m.k.numel() * m.k.element_size() for m in self._layers.values())
        if used + need > self.budget_bytes:
            return None
        m = _LayerMirror(torch.empty(bsz, hk, width, d, dtype=dtype),
                         torch.empty(bsz, hk, width, d, dtype=dtype), -1, keyed)
        self._layers[layer_id] = m
        return m
