"""Triton MLA (contract: ``core/kernels/mla.py``): split-KV decode over the latent cache.

Decode absorbs the up-projections: ``q_lat[h] = q_nope[h] @ w_kc[h]`` and, after attention,
``out[h] = o_lat[h] @ w_vc[h]^T`` (batched matmuls); in between one Triton kernel attends every
query head over the shared latent rows, as multi-query attention with keys ``[c_kv | k_pe]``
and values ``c_kv``: one program per (sequence, block of heads, split) reads each latent tile
once for all its heads, then :func:`decode_reduce_kernel` merges the splits that hold keys. The split count
depends only on the batch size and the configured maximum context length, and the kernel
reads lengths and pages from device tensors, so decode steps can be captured in graphs.
``write_kv`` is one Triton launch (:func:`mla_write_latent`); ``extend`` is the torch-native
one (it runs on any device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.kernels.mla import MLAConfig, MLALayer, MLAPrologue
from heteroserve.platforms.cpu.mla import TorchNativeMLA
from heteroserve.platforms.triton.attention_common import (
    NEG_INIT, log2_scores, online_softmax_step, page_slots,
)
from heteroserve.platforms.triton.attention_decode import (
    choose_num_splits, decode_reduce_kernel, split_share,
)
from heteroserve.platforms.triton.jit_math import exact_fp32, mma
from heteroserve.platforms.triton.mla_absorb import (
    FUSED_MAX_BATCH, AbsorbPrologue, absorb_query, merge_and_absorb_output,
)
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

BLOCK_H = 16


@triton.jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, cache_ptr, mid_o_ptr, mid_lse_ptr,
    seq_lens_ptr, kv_indptr_ptr, kv_indices_ptr, sm_scale,
    stride_qlb, stride_qlh, stride_qpb, stride_qph, stride_cs,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    NUM_HEADS: tl.constexpr, LORA: tl.constexpr, ROPE: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    EXACT_FP32: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    page_base = tl.load(kv_indptr_ptr + b)
    per, filled = split_share(seq_len, 0, NUM_SPLITS, BLOCK_N)
    if split >= filled:  # holds no key: the merge skips it
        return
    s_lo = split * per
    s_hi = tl.minimum(s_lo + per, seq_len)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < NUM_HEADS
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < LORA
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < ROPE
    q_lat = tl.load(q_lat_ptr + b.to(tl.int64) * stride_qlb + heads[:, None] * stride_qlh
                    + offs_c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + b.to(tl.int64) * stride_qpb + heads[:, None] * stride_qph
                   + offs_r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)

    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n0 in range(s_lo, s_hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = k_pos < s_hi
        rows = page_slots(kv_indices_ptr, page_base, k_pos, n_mask, PAGE_SIZE) * stride_cs
        latent = tl.load(cache_ptr + rows[:, None] + offs_c[None, :],
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        k_pe = tl.load(cache_ptr + rows[:, None] + LORA + offs_r[None, :],
                       mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        qk = mma(q_lat, tl.trans(latent), EXACT_FP32) + mma(q_pe, tl.trans(k_pe), EXACT_FP32)
        s = log2_scores(qk, sm_scale, 0.0, False)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(s, latent, acc, m_i, l_i, EXACT_FP32)

    has_keys = l_i > 0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mid = (mid_o_ptr + b.to(tl.int64) * stride_mb + heads[:, None] * stride_mh
           + split * stride_ms + offs_c[None, :])
    tl.store(mid, out.to(mid_o_ptr.dtype.element_ty), mask=h_mask[:, None] & c_mask[None, :])
    if NUM_SPLITS > 1:  # one split: ``mid_o`` is the merged output, no lse needed
        tl.store(mid_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse,
                 mask=h_mask)


@triton.jit
def _mla_write_kernel(latent_ptr, k_pe_ptr, cache_ptr, loc_ptr, stride_lt, stride_kt,
                      stride_cs, LORA: tl.constexpr, ROPE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = cache_ptr + tl.load(loc_ptr + t).to(tl.int64) * stride_cs
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < LORA
    lat = tl.load(latent_ptr + t * stride_lt + offs_c, mask=c_mask)
    tl.store(row + offs_c, lat.to(cache_ptr.dtype.element_ty), mask=c_mask)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < ROPE
    pe = tl.load(k_pe_ptr + t * stride_kt + offs_r, mask=r_mask)
    tl.store(row + LORA + offs_r, pe.to(cache_ptr.dtype.element_ty), mask=r_mask)


def mla_write_latent(latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                     loc: torch.Tensor) -> None:
    """Store row ``[latent[t] | k_pe[t]]`` at flat slot ``loc[t]`` of ``cache [pages,
    page_size, c + r]`` for every token ``t`` (one launch). ``latent [T, c]``, ``k_pe [T, r]``:
    last dims contiguous, rows any stride."""
    t, lora = latent.shape
    rope = k_pe.shape[-1]
    if t == 0:
        return
    if latent.stride(1) != 1 or k_pe.stride(1) != 1:
        raise ValueError("mla write_kv: latent and k_pe need contiguous last dims")
    flat = cache.view(-1, cache.shape[-1])
    _mla_write_kernel[(t,)](
        latent, k_pe, flat, loc, latent.stride(0), k_pe.stride(0), flat.stride(0),
        LORA=lora, ROPE=rope, BLOCK_C=triton.next_power_of_2(lora),
        BLOCK_R=max(16, triton.next_power_of_2(rope)), num_warps=4)


def _block_n(q_lat: torch.Tensor) -> int:
    return 16 if q_lat.device.type == "cpu" or q_lat.dtype == torch.float32 else 32


def _split_buffers(q_lat: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs ``[B, H, S, c]`` and log2-sum-exps ``[B, H, S]``."""
    bsz, heads, lora = q_lat.shape
    mid_o = torch.empty((bsz, heads, num_splits, lora), dtype=torch.float32, device=q_lat.device)
    mid_lse = torch.empty((bsz, heads, num_splits), dtype=torch.float32, device=q_lat.device)
    return mid_o, mid_lse


def _launch_split(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                  mid_o: torch.Tensor, mid_lse: torch.Tensor, scale: float,
                  meta: AttentionMetadata, block_n: int) -> None:
    """The split kernel over ``mid_o [B, H, S, c]`` (with ``S == 1``: any ``mid_lse``)."""
    bsz, heads, lora = q_lat.shape
    num_splits = mid_o.shape[2]
    rope = q_pe.shape[-1]
    flat = cache.view(-1, cache.shape[-1])
    block_c = triton.next_power_of_2(lora)
    _mla_decode_split_kernel[(bsz, triton.cdiv(heads, BLOCK_H), num_splits)](
        q_lat, q_pe, flat, mid_o, mid_lse, meta.seq_lens, meta.kv_page_indptr,
        meta.kv_page_indices, float(scale),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), flat.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        NUM_HEADS=heads, LORA=lora, ROPE=rope, PAGE_SIZE=meta.page_size,
        NUM_SPLITS=num_splits, BLOCK_H=BLOCK_H, BLOCK_C=block_c,
        BLOCK_R=max(16, triton.next_power_of_2(rope)), BLOCK_N=block_n,
        EXACT_FP32=exact_fp32(q_lat.dtype), num_warps=8 if block_c >= 512 else 4,
        num_stages=2, **pdl_args(q_lat.device))


def mla_decode_latent(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      out: torch.Tensor, scale: float, meta: AttentionMetadata,
                      num_splits: int, block_n: int | None = None) -> torch.Tensor:
    """Fill ``out [B, H, c]`` with each sequence's attention over its latent rows: scores
    ``scale * (q_lat . c_kv + q_pe . k_pe)``, values ``c_kv``. ``q_lat [B, H, c]``,
    ``q_pe [B, H, r]`` (last dims contiguous), ``cache [pages, page_size, c + r]``."""
    bsz, heads, lora = q_lat.shape
    if bsz == 0:
        return out
    block_n = block_n or _block_n(q_lat)
    if num_splits == 1:  # the split kernel writes ``out`` directly, no merge
        _launch_split(q_lat, q_pe, cache, out.unsqueeze(2),
                      out.new_empty((1, 1, 1), dtype=torch.float32), scale, meta, block_n)
        return out
    mid_o, mid_lse = _split_buffers(q_lat, num_splits)
    _launch_split(q_lat, q_pe, cache, mid_o, mid_lse, scale, meta, block_n)
    decode_reduce_kernel[(bsz, heads)](
        mid_o, mid_lse, out, meta.seq_lens, 0,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, HEAD_DIM=lora, SPLIT_BLOCK_N=block_n, HAS_WINDOW=False,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=triton.next_power_of_2(lora),
        num_warps=4, **pdl_args(q_lat.device))
    return out


class TritonMLA(TorchNativeMLA):
    """MLA with a Triton split-KV decode (graph-safe) and a one-launch Triton ``write_kv``;
    ``extend`` from :class:`TorchNativeMLA`. Supports bf16/fp16/fp32, any page size, any
    head count.

    Decode of up to ``fused_max_batch`` sequences (:data:`mla_absorb.FUSED_MAX_BATCH`) runs
    the absorbed projections as Triton kernels around the split kernel
    (:mod:`heteroserve.platforms.triton.mla_absorb`: three PDL launches, and through
    :meth:`forward` the latent write rides in the first, through :meth:`forward_prologue`
    the latent norm and both rotations as well); larger batches use two cuBLAS BMMs and the
    separate merge."""

    graph_safe = True
    fused_max_batch = FUSED_MAX_BATCH

    def __init__(self, config: MLAConfig) -> None:
        super().__init__(config)
        self._splits: dict[int, int] = {}

    def _num_splits(self, batch_size: int, device: torch.device) -> int:
        if batch_size not in self._splits:
            self._splits[batch_size] = choose_num_splits(
                batch_size, triton.cdiv(self.config.num_heads, BLOCK_H),
                self.config.max_context_len, device)
        return self._splits[batch_size]

    def write_kv(self, latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        self._check_new_rows(latent, k_pe, meta)
        mla_write_latent(latent, k_pe, cache, meta.out_cache_loc)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                k_pe: torch.Tensor, cache: torch.Tensor, w_kc: torch.Tensor,
                w_vc: torch.Tensor, layer: MLALayer, meta: AttentionMetadata) -> torch.Tensor:
        if meta.mode is not ForwardMode.DECODE or not self._fused(q_nope.shape[0]):
            return super().forward(q_nope, q_pe, latent, k_pe, cache, w_kc, w_vc, layer, meta)
        self._check_new_rows(latent, k_pe, meta)
        return self._decode(q_nope, q_pe, cache, w_kc, w_vc, layer, meta,
                            (latent, k_pe, cache, meta.out_cache_loc))

    def forward_prologue(self, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         latent: torch.Tensor, k_pe: torch.Tensor, prologue: MLAPrologue,
                         cache: torch.Tensor, w_kc: torch.Tensor, w_vc: torch.Tensor,
                         layer: MLALayer, meta: AttentionMetadata) -> torch.Tensor | None:
        """Decode batches of up to ``fused_max_batch``: the latent norm and both rotations
        ride in the absorbed-query kernel (two launches fewer a layer), which stores the
        normed latent and rotated ``k_pe`` rows and a rotated copy of ``q_pe``. None
        otherwise (extend, larger batches, a rotary cache narrower than ``q_pe``)."""
        bsz = q_nope.shape[0]
        if meta.mode is not ForwardMode.DECODE or not self._fused(bsz) or \
                prologue.cos_sin_cache.shape[-1] != q_pe.shape[-1]:
            return None
        self._check_new_rows(latent, k_pe, meta)
        q_pe_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)
        folded = AbsorbPrologue(q_pe, q_pe_out, prologue.norm_weight, prologue.eps,
                                prologue.positions, prologue.cos_sin_cache, prologue.is_neox)
        return self._decode(q_nope, q_pe_out, cache, w_kc, w_vc, layer, meta,
                            (latent, k_pe, cache, meta.out_cache_loc), folded)

    def decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        return self._decode(q_nope, q_pe, cache, w_kc, w_vc, layer, meta, None)

    def _fused(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.fused_max_batch

    def _decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
                meta: AttentionMetadata,
                new_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
                prologue: AbsorbPrologue | None = None) -> torch.Tensor:
        """Decode; ``new_rows`` (fused batches only): the latent write to fold in, with
        ``prologue`` its norm and rotations (``q_pe`` is then ``prologue.q_pe_out``, filled
        by the absorbed-query kernel before the split kernel reads it)."""
        bsz = self._check_decode(q_nope, q_pe, cache, w_kc, w_vc, meta)
        c = self.config
        splits = self._num_splits(bsz, q_nope.device)
        latent_shape = (bsz, c.num_heads, c.kv_lora_rank)
        if not self._fused(bsz):
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_kc).transpose(0, 1).contiguous()
            o_lat = q_nope.new_empty(latent_shape)
            mla_decode_latent(q_lat, q_pe, cache, o_lat, layer.scale, meta, splits)
            return torch.bmm(o_lat.transpose(0, 1), w_vc.transpose(1, 2)).transpose(0, 1)
        q_lat = absorb_query(q_nope, w_kc, q_nope.new_empty(latent_shape), new_rows, prologue)
        mid_o, mid_lse = _split_buffers(q_lat, splits)
        block_n = _block_n(q_lat)
        _launch_split(q_lat, q_pe, cache, mid_o, mid_lse, layer.scale, meta, block_n)
        out = torch.empty((bsz, c.num_heads, c.v_head_dim), dtype=q_nope.dtype,
                          device=q_nope.device)
        return merge_and_absorb_output(mid_o, mid_lse, w_vc, out, meta.seq_lens, block_n)
