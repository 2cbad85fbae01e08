"""Per-layer head-major copies of the running decode batch's K/V, kept across decode steps.

A decode step attends every sequence of the batch over its whole cache. Gathering those K/V
rows out of the paged pool every step and every layer costs as much as the attention itself
on a host CPU, although from one decode step to the next each sequence gains one token and
nothing else changes. :class:`DecodeKVMirror` keeps, per layer, ``[B, Hk, L, D]`` buffers
(contiguous per head, what SDPA reads fastest) that hold the previous step's gather, and
refreshes only the positions whose slot changed or was written this step. In the steady
state (every sequence gained exactly its one written token, nothing else moved) a layer copies
the new K/V rows it was handed straight into the mirror instead of reading them back from the
cache.

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
        #: the update is exactly row ``b`` <- written slot ``b`` (the steady state)
        self._direct = False
        #: flat row indices of the update into ``[Bcap * Hk * Lcap, D]`` views, by (Hk, Lcap)
        self._flat_rows: dict[tuple[int, int], torch.Tensor] = {}

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
        self._update, self._direct = None, False
        self._flat_rows.clear()
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
        self._direct = (rows_idx.numel() == bsz == written.numel()
                        and bool(torch.equal(rows_idx, torch.arange(bsz)))
                        and bool(torch.equal(self._update.slots, written.to(table.dtype))))

    @property
    def planned_refresh(self) -> int | None:
        """How many positions each layer refreshes this step (None: a full gather)."""
        return None if self._update is None else int(self._update.rows.numel())

    @property
    def steady(self) -> bool:
        """Whether this step's refresh is exactly each sequence's written token (then
        :meth:`kv` copies the ``written`` rows it is handed)."""
        return self._direct

    @property
    def active(self) -> bool:
        """Whether the current step was announced (:meth:`kv` may be used)."""
        return self._active

    def kv(self, layer_id: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
           dtype: torch.dtype, written: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's ``[B, Hk, L, D]`` K and V of layer ``layer_id`` in ``dtype`` (views of
        the mirror, valid until the next step), from contiguous NHD caches ``[pages,
        page_size, Hk, D]``; None when the mirror would exceed the budget. ``written``: the
        ``[B, Hk, D]`` K and V rows stored this step, in the batch's order, exactly as the
        caches hold them (same dtype); the steady state copies them instead of the caches'."""
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
                rows = self._rows_of(upd, hk, m.k.shape[2])
                if (written is not None and self._direct and written[0].dtype == dtype
                        and k_cache.dtype == dtype):
                    new_k, new_v = written
                else:
                    new_k = flat_k.index_select(0, upd.slots).to(dtype)
                    new_v = flat_v.index_select(0, upd.slots).to(dtype)
                m.k.view(-1, d).index_copy_(0, rows, new_k.reshape(-1, d))
                m.v.view(-1, d).index_copy_(0, rows, new_v.reshape(-1, d))
        else:
            idx = table.reshape(-1)
            for buf, flat in ((m.k, flat_k), (m.v, flat_v)):
                rows = flat.index_select(0, idx).view(bsz, width, hk, d)
                buf[:bsz, :, :width].copy_(rows.permute(0, 2, 1, 3))
        m.epoch = self._epoch
        return m.k[:bsz, :, :width], m.v[:bsz, :, :width]

    def _rows_of(self, upd: MirrorUpdate, hk: int, cap: int) -> torch.Tensor:
        """int64 ``[n * Hk]``: the update's rows of a ``[Bcap * Hk * cap, D]`` mirror view,
        position-major then head (the order of ``[n, Hk, D]`` sources)."""
        key = (hk, cap)
        rows = self._flat_rows.get(key)
        if rows is None:
            heads = torch.arange(hk)
            rows = ((upd.rows[:, None] * hk + heads) * cap + upd.positions[:, None]).reshape(-1)
            self._flat_rows[key] = rows
        return rows

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
