"""The absorbed MLA projections of a small decode batch as Triton kernels with PDL.

At batch 1 a DeepSeek layer's MLA decode was five launches without programmatic dependent
launch: the latent write, a cuBLAS BMM ``q_nope @ w_kc``, the split-KV kernel, the merge of
the splits and a second BMM ``o_lat @ w_vc^T`` (an H200 profile of DeepSeek-V2-Lite: the two
BMMs 6.7 us a layer for 4 MB of weights). For up to :data:`FUSED_MAX_BATCH` sequences these
two kernels take their place around the split kernel, three PDL launches in all:

1. :func:`absorb_query` (grid ``heads x latent blocks``): ``q_lat[b, h] = q_nope[b, h] @
   w_kc[h]`` for every sequence ``b``, each program holding one ``[qk_nope, BLOCK_C]`` tile of
   ``w_kc`` (loaded before the PDL wait: no kernel writes weights); optionally it also stores
   this step's latent rows ``[c_kv | k_pe]`` into the cache (what ``write_kv`` does, one
   launch fewer).
2. :func:`merge_and_absorb_output` (grid ``sequences x heads x v blocks``): merges the filled
   splits of the split kernel (as ``decode_reduce_kernel`` does) in fp32 and multiplies the
   merged latent output by its ``[BLOCK_V, kv_lora_rank]`` tile of ``w_vc``, writing
   ``out[b, h]`` in the model dtype; ``o_lat`` is never rounded or stored.

Each program re-reads its weight tile per sequence (from the L2 after the first), so the cost
grows with the batch; larger batches keep the BMMs (tensor cores, one weight read).

Measured at batch 1 only (H100, 2026-12-06, ``benchmarks/deepseek_rule.py``): DeepSeek-V2-Lite
decode 365.1 -> 393.2 tok/s against the BMM path in the same call. The limit of 8 sequences is
an estimate (the merge's ``w_vc`` re-reads reach 16 MB of L2 traffic there), not tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.attention_decode import split_share
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous
from heteroserve.platforms.triton.rotary import rotate_vector, token_cos_sin

#: Largest decode batch that takes these kernels instead of the two BMMs.
FUSED_MAX_BATCH = 8
#: latent columns per :func:`absorb_query` program and ``v`` rows per merge program
BLOCK_C = 64
BLOCK_V = 16
#: splits merged per step of the merge kernel's loop
MERGE_SPLITS = 4


@dataclass(frozen=True)
class AbsorbPrologue:
    """What :func:`absorb_query` folds in besides the latent write (the core's
    ``MLAPrologue`` plus where the rotated query goes): ``q_pe [B, H, r]`` un-rotated (any
    strides but the last), ``q_pe_out [B, H, r]`` for the rotated copy, the latent norm's
    ``norm_weight [c]`` and ``eps``, ``positions`` int64 ``[B]``, ``cos_sin_cache`` fp32
    ``[max_position, r]`` and ``is_neox``."""

    q_pe: torch.Tensor
    q_pe_out: torch.Tensor
    norm_weight: torch.Tensor
    eps: float
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool

    def check(self, batch: int, heads: int, lora: int, rope: int) -> None:
        """``ValueError`` naming the tensor whose shape or layout does not fit."""
        for name, t in (("q_pe", self.q_pe), ("q_pe_out", self.q_pe_out)):
            if tuple(t.shape) != (batch, heads, rope) or t.stride(2) != 1:
                raise ValueError(f"mla prologue: {name} must be [{batch}, {heads}, {rope}] "
                                 f"with a contiguous last dim, got {tuple(t.shape)}")
        if tuple(self.norm_weight.shape) != (lora,) or self.positions.shape != (batch,):
            raise ValueError(f"mla prologue: norm_weight {tuple(self.norm_weight.shape)} / "
                             f"positions {tuple(self.positions.shape)} do not fit c={lora}, "
                             f"B={batch}")
        if self.cos_sin_cache.dim() != 2 or self.cos_sin_cache.shape[1] != rope or \
                self.cos_sin_cache.stride(1) != 1:
            raise ValueError(f"mla prologue: cos_sin_cache {tuple(self.cos_sin_cache.shape)} "
                             f"must be [max_position, {rope}] with a contiguous last dim")


@triton.jit
def _absorb_query_kernel(
    q_nope_ptr, w_kc_ptr, q_lat_ptr, latent_ptr, k_pe_ptr, cache_ptr, loc_ptr, batch,
    q_pe_ptr, q_pe_out_ptr, norm_w_ptr, pos_ptr, cos_sin_ptr, eps,
    stride_qb, stride_qh, stride_wh, stride_wd, stride_lb, stride_lh, stride_nt, stride_kt,
    stride_cs, stride_pb, stride_ph, stride_ob, stride_oh, stride_cos,
    NOPE: tl.constexpr, LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    WRITE_KV: tl.constexpr, PROLOGUE: tl.constexpr, IS_NEOX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    h = tl.program_id(0)
    cb = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < NOPE
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < LORA
    w = tl.load(w_kc_ptr + h * stride_wh + offs_d[:, None] * stride_wd + offs_c[None, :],
                mask=d_mask[:, None] & c_mask[None, :], other=0.0)
    if PROLOGUE:
        norm_w = tl.load(norm_w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    wait_for_previous(USE_PDL)
    w = w.to(tl.float32)
    half_offs = tl.arange(0, BLOCK_R)
    half_mask = half_offs < ROPE // 2
    for b in range(batch):  # at most FUSED_MAX_BATCH: int32 row offsets suffice
        q = tl.load(q_nope_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask,
                    other=0.0).to(tl.float32)
        q_lat = tl.sum(w * q[:, None], axis=0)
        tl.store(q_lat_ptr + b * stride_lb + h * stride_lh + offs_c,
                 q_lat.to(q_lat_ptr.dtype.element_ty), mask=c_mask)
        if PROLOGUE:
            if cb == 0:  # each head's first program rotates its q_pe into the output
                cos, sin = token_cos_sin(pos_ptr, cos_sin_ptr, b, stride_cos, half_offs,
                                         half_mask, ROPE // 2)
                rotate_vector(q_pe_ptr + b * stride_pb + h * stride_ph,
                              q_pe_out_ptr + b * stride_ob + h * stride_oh, cos, sin,
                              half_offs, half_mask, ROPE // 2, IS_NEOX)
                if WRITE_KV:
                    if h == 0:  # and head 0's rotates k_pe into the cache row
                        pe_row = cache_ptr + tl.load(loc_ptr + b).to(tl.int64) * stride_cs
                        rotate_vector(k_pe_ptr + b * stride_kt, pe_row + LORA, cos, sin,
                                      half_offs, half_mask, ROPE // 2, IS_NEOX)
        if WRITE_KV:
            if h == 0:  # head 0's programs store the latent row, block by block
                row = cache_ptr + tl.load(loc_ptr + b).to(tl.int64) * stride_cs
                lat = tl.load(latent_ptr + b * stride_nt + offs_c, mask=c_mask)
                if PROLOGUE:  # RMSNorm over the whole row, as the rms_norm op's kernel
                    offs_l = tl.arange(0, BLOCK_L)
                    whole = tl.load(latent_ptr + b * stride_nt + offs_l, mask=offs_l < LORA,
                                    other=0.0).to(tl.float32)
                    inv_rms = 1.0 / tl.sqrt(tl.sum(whole * whole, 0) / LORA + eps)
                    lat = lat.to(tl.float32) * inv_rms * norm_w
                tl.store(row + offs_c, lat.to(cache_ptr.dtype.element_ty), mask=c_mask)
                if cb == 0:
                    if not PROLOGUE:  # (with it, rotated above)
                        offs_r = tl.arange(0, BLOCK_R)
                        r_mask = offs_r < ROPE
                        pe = tl.load(k_pe_ptr + b * stride_kt + offs_r, mask=r_mask)
                        tl.store(row + LORA + offs_r, pe.to(cache_ptr.dtype.element_ty),
                                 mask=r_mask)


def absorb_query(q_nope: torch.Tensor, w_kc: torch.Tensor, q_lat: torch.Tensor,
                 new_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                 | None = None, prologue: AbsorbPrologue | None = None) -> torch.Tensor:
    """Fill ``q_lat [B, H, c]`` with ``q_nope [B, H, dn] @ w_kc [H, dn, c]`` (fp32 sums,
    rounded to ``q_lat.dtype``). ``new_rows``: ``(latent [B, c], k_pe [B, r], cache, loc)``
    to also store row ``[latent[b] | k_pe[b]]`` at flat slot ``loc[b]`` of ``cache [pages,
    page_size, c + r]``. ``prologue`` (needs ``new_rows``): the stored latent is RMS-normed
    and the stored ``k_pe`` rotated, and ``prologue.q_pe`` is rotated into
    ``prologue.q_pe_out`` (``[B, H, r]``), as :class:`AbsorbPrologue` says. Last dims
    contiguous; other strides any."""
    bsz, heads, nope = q_nope.shape
    lora = w_kc.shape[-1]
    if bsz == 0:
        return q_lat
    if q_nope.stride(2) != 1 or w_kc.stride(2) != 1 or q_lat.stride(2) != 1:
        raise ValueError("mla absorb_query: q_nope, w_kc and q_lat need contiguous last dims")
    write = new_rows is not None
    if write:
        latent, k_pe, cache, loc = new_rows
        if latent.stride(1) != 1 or k_pe.stride(1) != 1:
            raise ValueError("mla absorb_query: latent and k_pe need contiguous last dims")
        flat = cache.view(-1, cache.shape[-1])
    else:  # unused pointers (WRITE_KV is off)
        latent, k_pe, flat, loc = q_lat[:, 0], q_lat[:, 0], q_lat[:, 0], q_lat
    if prologue is not None and not write:
        raise ValueError("mla absorb_query: a prologue needs the new rows it norms and rotates")
    rope = k_pe.shape[-1] if write else 2
    p = prologue or AbsorbPrologue(q_lat, q_lat, q_lat[0, 0], 0.0, loc, q_lat[0], False)
    if prologue is not None:
        prologue.check(bsz, heads, lora, rope)
    _absorb_query_kernel[(heads, triton.cdiv(lora, BLOCK_C))](
        q_nope, w_kc, q_lat, latent, k_pe, flat, loc, bsz,
        p.q_pe, p.q_pe_out, p.norm_weight, p.positions, p.cos_sin_cache, float(p.eps),
        q_nope.stride(0), q_nope.stride(1), w_kc.stride(0), w_kc.stride(1),
        q_lat.stride(0), q_lat.stride(1), latent.stride(0), k_pe.stride(0), flat.stride(0),
        p.q_pe.stride(0), p.q_pe.stride(1), p.q_pe_out.stride(0), p.q_pe_out.stride(1),
        p.cos_sin_cache.stride(0),
        NOPE=nope, LORA=lora, ROPE=rope, BLOCK_D=triton.next_power_of_2(nope),
        BLOCK_C=BLOCK_C, BLOCK_L=triton.next_power_of_2(lora),
        BLOCK_R=max(16, triton.next_power_of_2(rope)), WRITE_KV=write,
        PROLOGUE=prologue is not None, IS_NEOX=p.is_neox, num_warps=4,
        **pdl_args(q_nope.device))
    return q_lat


@triton.jit
def _merge_absorb_kernel(
    mid_o_ptr, mid_lse_ptr, w_vc_ptr, out_ptr, seq_lens_ptr,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_wh, stride_wv,
    stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLIT_BLOCK_N: tl.constexpr, LORA: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_SPLITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V_DIM
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < LORA
    w = tl.load(w_vc_ptr + h * stride_wh + offs_v[:, None] * stride_wv + offs_c[None, :],
                mask=v_mask[:, None] & c_mask[None, :], other=0.0)
    wait_for_previous(USE_PDL)
    mid = mid_o_ptr + b * stride_mb + h * stride_mh
    if NUM_SPLITS == 1:
        o_lat = tl.load(mid + offs_c, mask=c_mask, other=0.0)
    else:
        _, filled = split_share(tl.load(seq_lens_ptr + b), 0, NUM_SPLITS, SPLIT_BLOCK_N)
        lse_row = mid_lse_ptr + b * stride_lb + h * stride_lh
        offs_all = tl.arange(0, BLOCK_S)
        m = tl.max(tl.load(lse_row + offs_all, mask=offs_all < filled, other=float("-inf")), 0)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        total = 0.0
        for s0 in range(0, filled, MERGE_SPLITS):
            offs_s = s0 + tl.arange(0, MERGE_SPLITS)
            s_mask = offs_s < filled
            wgt = tl.exp2(tl.load(lse_row + offs_s, mask=s_mask, other=float("-inf")) - m)
            parts = tl.load(mid + offs_s[:, None] * stride_ms + offs_c[None, :],
                            mask=s_mask[:, None] & c_mask[None, :], other=0.0)
            acc += tl.sum(parts * wgt[:, None], axis=0)
            total += tl.sum(wgt, axis=0)
        o_lat = acc / total
    out = tl.sum(w.to(tl.float32) * o_lat[None, :], axis=1)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_v, out.to(out_ptr.dtype.element_ty),
             mask=v_mask)


def merge_and_absorb_output(mid_o: torch.Tensor, mid_lse: torch.Tensor, w_vc: torch.Tensor,
                            out: torch.Tensor, seq_lens: torch.Tensor,
                            split_block_n: int) -> torch.Tensor:
    """Fill ``out [B, H, dv]`` with ``merge(mid_o, mid_lse)[b, h] @ w_vc[h]^T``.

    ``mid_o`` fp32 ``[B, H, S, c]`` and ``mid_lse`` fp32 ``[B, H, S]`` (log2-sum-exp) are the
    split kernel's partial outputs; of sequence ``b`` only the first ``split_share(seq_lens[b],
    0, S, split_block_n)`` splits are read (with ``S == 1``: ``mid_o[b, h, 0]`` is the output,
    ``mid_lse`` is not read). ``w_vc [H, dv, c]`` with a contiguous last dim."""
    bsz, heads, splits, lora = mid_o.shape
    v_dim = w_vc.shape[1]
    if bsz == 0:
        return out
    if w_vc.stride(2) != 1 or mid_o.stride(3) != 1 or out.stride(2) != 1:
        raise ValueError("mla merge_and_absorb_output: w_vc, mid_o and out need contiguous "
                         "last dims")
    _merge_absorb_kernel[(bsz, heads, triton.cdiv(v_dim, BLOCK_V))](
        mid_o, mid_lse, w_vc, out, seq_lens,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        w_vc.stride(0), w_vc.stride(1), out.stride(0), out.stride(1),
        NUM_SPLITS=splits, SPLIT_BLOCK_N=split_block_n, LORA=lora, V_DIM=v_dim,
        BLOCK_C=triton.next_power_of_2(lora), BLOCK_V=BLOCK_V,
        BLOCK_S=triton.next_power_of_2(splits), MERGE_SPLITS=MERGE_SPLITS,
        num_warps=4, **pdl_args(out.device))
    return out
