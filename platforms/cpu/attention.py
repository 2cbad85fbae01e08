"""Torch-native paged attention (contract: ``core/kernels/attention.py``), built for CPU.

Runs on any torch device. :meth:`~TorchNativeAttention.prepare` turns the step's page tables
into slot indices once per step; every layer then gathers exactly the K/V slots it needs with
one ``index_select`` per cache (on the host, decode gathers head-major into two reused buffers:
contiguous per head for SDPA, and no page faults on fresh multi-MB tensors every layer) and
attends with ``F.scaled_dot_product_attention`` on the
storage dtype (its CPU flash kernel computes scores, softmax and the weighted sum in fp32
and rounds once at the end). Decode attends the whole batch in one call, the query heads of a
KV head as that head's query rows (GQA without repeating K/V); a mask is built only when the
sequences' lengths differ or a sliding window cuts keys off. Extend attends sequence by
sequence, causal without a mask when there is no cached prefix. Logit soft-capping, which
SDPA cannot express, takes an fp32 matmul path. No host synchronisation: only the host-side
lengths in the metadata drive the Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionLayer, AttentionMetadata, ForwardMode,
)
from heteroserve.core.platform import KVLayout
from heteroserve.platforms.cpu.compiled import paged_attention, register_backend
from heteroserve.platforms.cpu.decode_mirror import DecodeKVMirror

#: Upper bound on score (or mask) elements materialised at once per sequence chunk.
_SCORE_BUDGET = 1 << 24
#: Largest decode K (or V) gather kept in a reused host buffer, in bytes; larger gathers
#: allocate per call.
_GATHER_BUFFER_BYTES = 64 << 20
#: Most bytes the per-layer decode K/V mirrors (:mod:`.decode_mirror`) hold in all; layers
#: past it gather per step.
_MIRROR_BYTES = 512 << 20


def _to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the cache dtype; fp8 saturates at its largest finite value."""
    if dtype.itemsize == 1 and dtype.is_floating_point:
        fmax = float(torch.finfo(dtype).max)
        return x.to(torch.float32).clamp(-fmax, fmax).to(dtype)
    return x if x.dtype == dtype else x.to(dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` (``x`` itself when it already is: no dispatch on the hot path)."""
    return x if x.dtype == dtype else x.to(dtype)


@dataclass
class _StepSlots:
    """One step's slot indices, shared by every layer.

    ``decode``: int64 ``[B, L]`` (``L`` = longest sequence), row ``b`` the slots of positions
    ``0..L-1`` of sequence ``b``, positions past its end pointing at its position 0 (finite
    data; masked out). ``extend``: per sequence, int64 ``[seq_len]``. ``ragged``: the decode
    lengths differ (a length mask is needed)."""

    meta: AttentionMetadata
    decode: torch.Tensor | None
    extend: list[torch.Tensor]
    ragged: bool
    #: decode rows of the caches viewed as ``[slots * Hk, D]``, head-major: int64
    #: ``[B * Hk * L]``, made on first use
    head_rows: torch.Tensor | None = None


def _page_table(meta: AttentionMetadata) -> torch.Tensor:
    """int64 ``[B, max_pages]``, row ``b`` the pages of sequence ``b``. When every sequence
    has the same page count (decode of equal lengths, the common case) the CSR page list is
    that table already and only a view and a cast are needed; otherwise it is
    ``meta.block_table`` (padded with page 0)."""
    ps, bsz = meta.page_size, meta.batch_size
    counts = {-(-s // ps) for s in meta.seq_lens_cpu}
    if len(counts) == 1:
        n = counts.pop()
        if n > 0:
            return meta.kv_page_indices[: bsz * n].view(bsz, n).to(torch.long)
    return meta.block_table.to(torch.long)


def _slot_table(meta: AttentionMetadata, width: int) -> torch.Tensor:
    """int64 ``[B, width]`` (``width <= max(seq_lens)`` rounded up to pages): slot of
    positions ``0..width-1`` of each sequence; positions at or past a sequence's length
    repeat the slot of its position 0."""
    ps = meta.page_size
    table = _page_table(meta)
    pages = -(-width // ps)
    if pages > table.shape[1]:
        raise ValueError(f"attention: {width} positions need {pages} pages, the page table "
                         f"lists {table.shape[1]}")
    offsets = torch.arange(ps, device=table.device)
    slots = (table[:, :pages, None] * ps + offsets).view(table.shape[0], pages * ps)[:, :width]
    if min(meta.seq_lens_cpu) < width:
        pos = torch.arange(width, device=table.device)
        inside = pos[None, :] < meta.seq_lens.to(torch.long)[:, None]
        slots = torch.where(inside, slots, slots[:, :1])
    return slots


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_len: torch.Tensor | int,
                 window: int | None) -> torch.Tensor:
    """Boolean "may attend", broadcast of ``q_pos [..., Q, 1]`` and ``k_pos [..., 1, K]``:
    causal, inside the sequence (``k_pos < k_len``) and, with ``window = w``,
    ``k_pos > q_pos - w``."""
    allowed = (k_pos <= q_pos) & (k_pos < k_len)
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      allowed: torch.Tensor | None, layer: AttentionLayer) -> torch.Tensor:
    """Soft-capped attention in fp32: ``q [N, Hq, Q, D]``, ``k/v [N, Hk, K, D]``, ``allowed``
    broadcastable to ``[N, Hq, Q, K]`` (None: all) -> ``[N, Hq, Q, D]`` in ``q.dtype``."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * layer.scale
    cap = float(layer.logit_cap)  # type: ignore[arg-type]
    scores = cap * torch.tanh(scores / cap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
            layer: AttentionLayer, causal: bool = False) -> torch.Tensor:
    """``q [N, Hq, Q, D]``, ``k/v [N, Hk, K, D]`` (query head ``h`` reads KV head ``h //
    (Hq / Hk)``), ``allowed`` broadcastable to ``[N, Hq, Q, K]`` or None; ``causal`` (only with
    ``allowed`` None and ``Q == K``) masks the upper triangle. Every query row must allow >= 1
    key. Returns ``[N, Hq, Q, D]`` in ``q.dtype``."""
    if layer.logit_cap is not None:
        if causal:
            n = q.shape[-2]
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return _capped_attention(q, k, v, allowed, layer)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal,
                                          scale=layer.scale, enable_gqa=q.shape[1] != k.shape[1])


class TorchNativeAttention(AttentionBackend):
    """Paged attention with plain torch ops, NHD cache layout, any page size.

    Supports GQA, sliding windows (Hugging Face convention), logit soft-capping, any head
    size, q dtypes bf16/fp16/fp32 and cache dtypes bf16/fp16/fp32 or fp8 (``fp8_e4m3``,
    stored with saturation). Raises ``ValueError`` when tensor shapes do not match the config
    or the metadata.
    """

    kv_layout = KVLayout.NHD
    page_sizes = None

    def __init__(self, config) -> None:
        super().__init__(config)
        self._slots: _StepSlots | None = None
        #: host buffers the decode gathers write into (K, V): a fresh multi-MB tensor per
        #: layer costs the host page faults on first touch
        self._gather_buffers: list[torch.Tensor | None] = [None, None]
        self._mirror = DecodeKVMirror(_MIRROR_BYTES)
        self._compiled_handle = register_backend(self)

    # -- layout-specific indexing (overridden by the HND variant) --------------------------
    def _store(self, cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        if cache.is_contiguous():  # slots are distinct: a copy per row
            if cache.dtype.itemsize == 1:  # fp8: aten copies rows of bytes, not of fp8
                cache, x = cache.view(torch.uint8), x.view(torch.uint8)
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)
        else:
            ps = cache.shape[1]
            cache[slots // ps, slots % ps] = x

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` int64 of any shape ``S`` -> ``[*S, Hk, D]`` (a copy)."""
        if not cache.is_contiguous():
            ps = cache.shape[1]
            return cache[slots // ps, slots % ps]
        flat = cache.view(-1, *cache.shape[2:])
        return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[2:])

    def _gather_heads(self, which: int, cache: torch.Tensor, step: _StepSlots) -> torch.Tensor:
        """Decode K (``which`` 0) or V (1) of a contiguous NHD host cache, head-major: ``[B,
        Hk, L, D]`` contiguous (what SDPA reads fastest), in a reused buffer when it fits
        :data:`_GATHER_BUFFER_BYTES`. Valid until the next call with the same ``which``."""
        assert step.decode is not None
        bsz, width = step.decode.shape
        hk, d = cache.shape[2], cache.shape[3]
        if step.head_rows is None:
            heads = torch.arange(hk, device=cache.device)
            step.head_rows = (step.decode[:, None, :] * hk + heads[None, :, None]).reshape(-1)
        flat = cache.view(-1, d)
        n = step.head_rows.numel() * d
        if n * cache.element_size() > _GATHER_BUFFER_BYTES:
            return flat.index_select(0, step.head_rows).view(bsz, hk, width, d)
        buf = self._gather_buffers[which]
        if buf is None or buf.numel() < n or buf.dtype != cache.dtype:
            # contexts grow a token a step: grow by half so most steps reuse the buffer
            cap = _GATHER_BUFFER_BYTES // cache.element_size()
            grown = 0 if buf is None or buf.dtype != cache.dtype else buf.numel() * 3 // 2
            buf = torch.empty(min(cap, max(n, grown)), dtype=cache.dtype)
            self._gather_buffers[which] = buf
        out = buf[:n].view(-1, d)
        torch.index_select(flat, 0, step.head_rows, out=out)
        return out.view(bsz, hk, width, d)

    # -- helpers ---------------------------------------------------------------------------
    def _check(self, q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        c = self.config
        if q.dim() != 3 or q.shape[1:] != (c.num_q_heads, c.head_size):
            raise ValueError(f"attention: q must be [T, {c.num_q_heads}, {c.head_size}], "
                             f"got {tuple(q.shape)}")
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"attention: q has {q.shape[0]} rows but the metadata has "
                             f"{meta.num_tokens} new tokens")
        if k_cache.shape[1:] != self.kv_cache_shape(1)[1:]:
            raise ValueError(f"attention: cache shape {tuple(k_cache.shape)} does not match "
                             f"{self.kv_layout.value} layout {self.kv_cache_shape(-1)}")

    def _step_slots(self, meta: AttentionMetadata) -> _StepSlots:
        """This step's slot indices, computed on the first layer (or in :meth:`prepare`)."""
        if self._slots is not None and self._slots.meta is meta:
            return self._slots
        self._mirror.reset()  # a step :meth:`prepare` did not announce
        return self._plan_slots(meta)

    def _plan_slots(self, meta: AttentionMetadata) -> _StepSlots:
        """Compute and keep the step's slot indices."""
        lens = meta.seq_lens_cpu
        if meta.mode is ForwardMode.DECODE and lens:
            slots = _StepSlots(meta, _slot_table(meta, max(lens)), [], min(lens) != max(lens))
        else:
            table = _slot_table(meta, max(lens, default=1)) if lens else None
            slots = _StepSlots(meta, None, [] if table is None else
                               [table[b, :n] for b, n in enumerate(lens)], False)
        self._slots = slots
        return slots

    # -- contract --------------------------------------------------------------------------
    def prepare(self, meta: AttentionMetadata) -> None:
        """Plan the step's slot indices; on the host, announce a decode step to the K/V
        mirror (any other step resets it: prefill may reuse freed slots)."""
        step = self._plan_slots(meta)  # the same metadata may come back with new contents
        if (step.decode is not None and step.decode.device.type == "cpu"
                and self.kv_layout is KVLayout.NHD):
            self._mirror.begin_step(step.decode, meta.out_cache_loc)
        else:
            self._mirror.reset()

    def current_meta(self) -> AttentionMetadata:
        """The metadata of the step :meth:`prepare` planned last. Raises ``RuntimeError``
        before any."""
        if self._slots is None:
            raise RuntimeError("attention: no step prepared")
        return self._slots.meta

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: AttentionLayer,
                meta: AttentionMetadata) -> torch.Tensor:
        """The contract's ``forward``. Inside a ``torch.compile`` trace it becomes one opaque
        op (:mod:`.compiled`) that runs :meth:`forward_eager` on the prepared step's
        metadata (``meta`` must be that step's, as the runner guarantees)."""
        if torch.compiler.is_compiling():
            return paged_attention(self._compiled_handle, q, k, v, k_cache, v_cache, layer)
        return self.forward_eager(q, k, v, k_cache, v_cache, layer, meta)

    def forward_eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, layer: AttentionLayer,
                      meta: AttentionMetadata) -> torch.Tensor:
        """Write K/V, then attend according to ``meta.mode`` (the base class's forward; a
        decode hands the K/V mirror the rows it just stored)."""
        self.write_kv(k, v, k_cache, v_cache, meta)
        if meta.mode is ForwardMode.DECODE:
            return self._decode(q, k_cache, v_cache, layer, meta, (k, v))
        return self.extend(q, k_cache, v_cache, layer, meta)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """Store ``k/v [T, Hk, D]`` at slots ``meta.out_cache_loc``; nothing else changes."""
        c = self.config
        if k.shape != v.shape or k.shape[1:] != (c.num_kv_heads, c.head_size):
            raise ValueError(f"write_kv: k/v must be [T, {c.num_kv_heads}, {c.head_size}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != meta.out_cache_loc.shape[0]:
            raise ValueError(f"write_kv: {k.shape[0]} tokens but {meta.out_cache_loc.shape[0]} "
                             "cache locations")
        loc = _as(meta.out_cache_loc, torch.long)
        self._store(k_cache, loc, _to_cache(k, k_cache.dtype))
        self._store(v_cache, loc, _to_cache(v, v_cache.dtype))

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of each new token over its prefix and the new tokens before it."""
        self._check(q, k_cache, meta)
        c = self.config
        out = torch.empty_like(q)
        if q.shape[0] == 0:
            return out
        slots = self._step_slots(meta).extend
        device, window = q.device, layer.sliding_window
        q_start = 0
        for b, (seq_len, prefix) in enumerate(zip(meta.seq_lens_cpu, meta.prefix_lens_cpu)):
            n_new = seq_len - prefix
            if n_new <= 0:
                continue
            # [L, Hk, D] -> [1, Hk, L, D]
            k_seq = self._gather(k_cache, slots[b]).to(q.dtype).transpose(0, 1)[None]
            v_seq = self._gather(v_cache, slots[b]).to(q.dtype).transpose(0, 1)[None]
            plain_causal = prefix == 0 and (window is None or window >= seq_len)
            chunk = n_new if plain_causal else \
                max(1, _SCORE_BUDGET // max(1, c.num_q_heads * seq_len))
            for lo in range(0, n_new, chunk):
                hi = min(n_new, lo + chunk)
                rows = slice(q_start + lo, q_start + hi)
                q_blk = q[rows].transpose(0, 1)[None]  # [1, Hq, n, D]
                if plain_causal:
                    o = _attend(q_blk, k_seq, v_seq, None, layer, causal=True)
                else:
                    # only keys some query of this chunk can see: causal end, window start
                    k_lo = 0 if window is None else max(0, prefix + lo - window + 1)
                    keys = slice(k_lo, prefix + hi)
                    q_pos = torch.arange(prefix + lo, prefix + hi, device=device)
                    k_pos = torch.arange(k_lo, prefix + hi, device=device)
                    allowed = _window_mask(q_pos[:, None], k_pos[None, :], seq_len, window)
                    o = _attend(q_blk, k_seq[:, :, keys], v_seq[:, :, keys], allowed, layer)
                out[rows] = o[0].transpose(0, 1)
            q_start += n_new
        return out

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence (at position ``seq_len - 1``) over its whole cache."""
        return self._decode(q, k_cache, v_cache, layer, meta, None)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                layer: AttentionLayer, meta: AttentionMetadata,
                written: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """:meth:`decode`; ``written``: the ``[B, Hk, D]`` K/V rows this step stored, when
        the caller has them (:meth:`forward_eager`)."""
        self._check(q, k_cache, meta)
        if q.shape[0] != meta.batch_size:
            raise ValueError(f"decode: expected one query per sequence ({meta.batch_size}), "
                             f"got {q.shape[0]}")
        c = self.config
        bsz, hk, group, d = q.shape[0], c.num_kv_heads, c.num_q_heads // c.num_kv_heads, c.head_size
        if bsz == 0:
            return torch.empty_like(q)
        step = self._step_slots(meta)
        assert step.decode is not None
        width = step.decode.shape[1]
        host_nhd = (q.device.type == "cpu" and self.kv_layout is KVLayout.NHD
                    and k_cache.is_contiguous() and v_cache.is_contiguous())
        mirrored = (self._mirror.kv(layer.layer_id, k_cache, v_cache, q.dtype, written)
                    if host_nhd and self._mirror.active else None)
        if mirrored is not None:
            k_all, v_all = mirrored  # [B, Hk, L, D]
        elif host_nhd:
            k_all = _as(self._gather_heads(0, k_cache, step), q.dtype)  # [B, Hk, L, D]
            v_all = _as(self._gather_heads(1, v_cache, step), q.dtype)
        else:
            k_all = _as(self._gather(k_cache, step.decode), q.dtype).transpose(1, 2)
            v_all = _as(self._gather(v_cache, step.decode), q.dtype).transpose(1, 2)
        window = layer.sliding_window
        allowed = None
        if step.ragged or (window is not None and window < width):
            seq_lens = meta.seq_lens.to(torch.long).view(bsz, 1, 1)
            k_pos = torch.arange(width, device=q.device).view(1, 1, width)
            allowed = _window_mask(seq_lens - 1, k_pos, seq_lens, window).view(bsz, 1, 1, width)
        o = _attend(q.view(bsz, hk, group, d), k_all, v_all, allowed, layer)  # [B, Hk, G, D]
        return o.reshape(bsz, c.num_q_heads, d)


class TorchNativeAttentionHND(TorchNativeAttention):
    """:class:`TorchNativeAttention` over HND caches ``[pages, Hk, page_size, D]``."""

    kv_layout = KVLayout.HND

    def _store(self, cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        ps = cache.shape[2]
        cache[slots // ps, :, slots % ps] = x

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        ps = cache.shape[2]
        return cache[slots // ps, :, slots % ps]
