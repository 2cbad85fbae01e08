"""cuda's default attention backend: :class:`TritonAttention` except for long extends, which
run in cuDNN's fused attention (``torch.ops.aten._scaled_dot_product_cudnn_attention``):

- a whole prompt of 2048+ tokens in one causal call;
- a chunk on a cached prefix as two calls that return their log-sum-exp, the prefix without a
  mask and the chunk causally, merged in fp32 registers by their log-sum-exps into the
  output rows (one Triton pass, :func:`merge_attention_into`).

Where cuDNN refuses the shapes, a whole prompt runs in torch's FlashAttention-2 SDPA
(``can_use_flash_attention``) and anything else in the Triton kernel.

**Bounded shapes.** torch builds a cuDNN plan per new shape (40-60 ms, an H100 and an H200,
2026-12-05) and keeps it, so the shapes cuDNN sees come from a bounded set: a sequence's
prefix ``P`` splits at ``P_b``, the largest multiple of :data:`PREFIX_BUCKET` not above it;
the remainder ``r = P - P_b`` of the prefix joins the chunk's ``n`` new tokens in the causal
call, whose ``r + n`` queries (the first ``r`` zero rows, dropped) and keys are padded at the
end to ``m``, a multiple of :data:`QUERY_BUCKET`. Padding at the end of a causal (top-left)
call is never seen by a real query, and a zero query row only makes its own discarded
output. The calls are ``[m] x [P_b]`` (no mask) and ``[m] x [m]`` (causal); under chunked
prefill of 8192 tokens ``r`` is 0, nothing is padded but a prompt's last chunk, and the
shapes repeat across requests (torch keys a plan on the operands' sizes and strides: those of
a gathered sequence's views do not depend on its length). A new shape pays its plan once
(about 40 ms on an H100: a 32k prompt's chunk on a 16k prefix took 0.44 s the first time
against 0.41 s on Triton), and :meth:`warm_up <TritonAttentionSDPAExtend.warm_up>` pays at
start-up for the shapes of a long prompt under chunked prefill (:func:`warm_up_extends`).

Why: on an H200 the Triton extend kernel reaches 50-55 % of the bf16 matmul rate on long
prompts (no TMA or warp specialisation). ``benchmarks/prefill_backends.py`` (2026-12-05 04:29
UTC, Llama-3.1-8B heads, ``results/prefill_backends_h200.json``), TFLOP/s of causal attention:

=====================  ======  =====  =====================
case                   Triton  flash  cuDNN
=====================  ======  =====  =====================
whole 8k prompt        372     315    600
whole 32k prompt       409     348    582
8k chunk on 8k cached  387     337    511 (split + merge)
8k chunk on 24k        409     340    562 (split + merge)
8k chunk on 94k        386     343    590 (split + merge)
=====================  ======  =====  =====================

(with a bottom-right mask in one call: cuDNN 235-273, flash 337-343.) The prefill rows side by
side on one H100 (2026-12-05 12:00 UTC, ``results/h100-20261205-1200-prefill-*.json``), this
backend against the rule before it (flash prompts, chunks on Triton): 8k 0.212-0.217 s
against 0.224 s, 32k 1.435-1.459 s against 1.431 s, 100k 7.64-7.74 s against 8.88 s.

How: each sequence's K/V rows are gathered out of the paged cache once per layer (``[L, Hk,
D]``, a layout the fused kernels read without a copy) and attended with native GQA. The
gather costs a read and a write of the sequence's K/V, small next to the attention's
``O(new * L)`` work from a few thousand new tokens on.

When: every sequence of the step has at least :attr:`min_new_tokens` new tokens, the layer has
no sliding window and no logit soft-cap, q and the caches share a bf16/fp16 dtype, and torch
says the fused kernel takes the shapes: never a slow unfused fallback. Anything else, decode
included, is :class:`TritonAttention`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.attention import (
    AttentionLayer, AttentionMetadata, AttentionPrologue, ForwardMode,
)
from heteroserve.platforms.triton.attention import TritonAttention
from heteroserve.platforms.triton.attention_merge import merge_attention_into
from heteroserve.platforms.triton.attention_prologue import check_prologue
from heteroserve.platforms.triton.qk_norm import qk_norm_rotary_into
from heteroserve.platforms.triton.rotary import rotate_into

#: fewest new tokens of every sequence for the dense path; below it the per-sequence gathers
#: and launches are not worth it and one Triton launch serves the whole batch (1024: the
#: 1024 x (1024/256) offline workload ran 2.7 % slower through SDPA than through Triton)
MIN_NEW_TOKENS = 2048
#: cuDNN's query (and causal key) lengths are padded to a multiple of this
QUERY_BUCKET = 1024
#: the unmasked cuDNN call covers the prefix up to a multiple of this
PREFIX_BUCKET = 4096


def _params(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> object:
    from torch.backends.cuda import SDPAParams

    return SDPAParams(q, k, v, None, 0.0, causal, True)


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's flash SDPA kernel takes ``q [1, Hq, n, D]``, ``k/v [1, Hk, L, D]`` with
    GQA (False off CUDA)."""
    if q.device.type != "cuda":
        return False
    from torch.backends.cuda import can_use_flash_attention

    return bool(can_use_flash_attention(_params(q, k, v, False), False))


def cudnn_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether torch's cuDNN attention takes these shapes with GQA (False off CUDA)."""
    if q.device.type != "cuda":
        return False
    from torch.backends.cuda import can_use_cudnn_attention

    return bool(can_use_cudnn_attention(_params(q, k, v, causal), False))


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                    lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's normalised output
    ``o [..., n, D]`` and natural-log sum-exp ``lse [..., n]`` (fp32): the two outputs
    weighted by ``exp(lse - max)``, in fp32, rounded to ``o1.dtype``."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(o1.dtype)


def warm_up_extends(max_context_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """``(prefix, new)`` extends whose cuDNN shapes :meth:`TritonAttentionSDPAExtend.warm_up`
    builds: every full chunk of a prompt up to ``max_context_len`` tokens chunked at
    ``chunk_size`` (``(k * chunk_size, chunk_size)``), then one padded prompt per query bucket
    below the chunk (the causal call of a prompt's last chunk). Empty when no chunk reaches
    :data:`MIN_NEW_TOKENS`."""
    if chunk_size < MIN_NEW_TOKENS:
        return []
    full = [(k * chunk_size, chunk_size)
            for k in range(max(0, max_context_len // chunk_size))]
    first = -(-(MIN_NEW_TOKENS + 1) // QUERY_BUCKET) * QUERY_BUCKET
    return full + [(0, m - 1) for m in range(first, min(chunk_size, max_context_len) + 1,
                                             QUERY_BUCKET)]


def bucketed_split(prefix: int, new: int) -> tuple[int, int, int]:
    """``(P_b, r, m)`` for a chunk of ``new`` tokens on ``prefix`` cached ones: the unmasked
    call's key count, the prefix rows that join the causal call, and that call's padded
    length (module docstring)."""
    p_b = prefix // PREFIX_BUCKET * PREFIX_BUCKET
    r = prefix - p_b
    return p_b, r, -(-(r + new) // QUERY_BUCKET) * QUERY_BUCKET


class TritonAttentionSDPAExtend(TritonAttention):
    """See the module docstring. Same contract, layouts and limits as
    :class:`TritonAttention`; only long extends take other kernels. ``cudnn_prompts`` /
    ``cudnn_chunks``: whether whole prompts / chunks on a cached prefix may go to cuDNN (both
    on; off, a whole prompt goes to flash and a chunk to Triton: knobs for side-by-side runs,
    ``benchmarks/prefill_cudnn_rule.py``)."""

    min_new_tokens = MIN_NEW_TOKENS
    cudnn_prompts = True
    cudnn_chunks = True
    #: whether :meth:`warm_up` builds the plans of :func:`warm_up_extends` at start-up
    warm_up_plans = True
    #: the device type whose fused kernels :meth:`warm_up` prepares
    fused_device_type = "cuda"
    #: merge a chunk's two calls in one Triton pass (:func:`merge_attention_into`; off:
    #: :func:`merge_attention`'s torch ops, then a copy into the output)
    fused_merge = True
    #: a one-prompt step returns cuDNN's output as it lies (off: copied into a fresh output,
    #: as before 55495e7)
    return_kernel_output = True
    #: a long extend's rotation writes q and k as fresh contiguous rows (:meth:`forward_prologue`)
    #: instead of the layer rotating its projection output in place and :meth:`extend` copying
    #: q into the rows cuDNN takes (off: that rotation and copy, a knob for side-by-side runs)
    rotate_into_rows = True

    def _dense(self, q: torch.Tensor, k_cache: torch.Tensor, layer: AttentionLayer,
               meta: AttentionMetadata) -> bool:
        return (layer.sliding_window is None and layer.logit_cap is None
                and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype
                and (self.cudnn_chunks or not any(meta.prefix_lens_cpu))
                and min(meta.extend_lens_cpu, default=0) >= self.min_new_tokens)

    def _cudnn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``q [1, Hq, n, D]`` over ``k/v [1, Hk, L, D]`` (``causal``: ``n == L``, top-left
        mask) in cuDNN's kernel: ``(out [1, Hq, n, D], lse [1, Hq, n] fp32 natural log, or
        None without with_lse)``, or None where cuDNN does not take the shapes."""
        if not cudnn_usable(q, k, v, causal):
            return None
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, with_lse, 0.0, causal, False, scale=scale)
        return res[0], (res[1].reshape(q.shape[:3]).float() if with_lse else None)

    def _flash_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor | None:
        """``q [1, Hq, n, D]`` over ``k/v [1, Hk, n, D]``, causal, in torch's flash kernel;
        None where it does not take the shapes."""
        if not flash_usable(q, k, v):
            return None
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=True)

    def _cudnn_sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                        scale: float, out: torch.Tensor | None) -> torch.Tensor | None:
        """One sequence through cuDNN in bucketed shapes (module docstring): ``q [1, Hq, n,
        D]`` over ``k/v [1, Hk, prefix + n, D]``, causally -> ``[n, Hq, D]``: written into
        ``out``, or with ``out`` None cuDNN's own output where it already lies that way (it
        matches q's layout, [n, Hq, D] rows here: no copy). None (``out`` untouched) where
        cuDNN does not take the shapes."""
        n = q.shape[2]
        p_b, r, m = bucketed_split(prefix, n)
        pad = m - r - n
        q_m, k_m, v_m = q, k[:, :, p_b:], v[:, :, p_b:]
        if r or pad:
            q_m = F.pad(q, (0, 0, r, pad))
            k_m, v_m = F.pad(k_m, (0, 0, 0, pad)), F.pad(v_m, (0, 0, 0, pad))
        own = self._cudnn(q_m, k_m, v_m, True, scale, with_lse=p_b > 0)
        if own is None:
            return None
        rows = slice(r, r + n)
        if p_b == 0:
            return _into(out, own[0][0, :, rows].transpose(0, 1))
        past = self._cudnn(q_m, k[:, :, :p_b], v[:, :, :p_b], False, scale, with_lse=True)
        if past is None:
            return None
        parts = (past[0][0, :, rows], past[1][0, :, rows], own[0][0, :, rows], own[1][0, :, rows])
        if not self.fused_merge:
            return _into(out, merge_attention(*parts).transpose(0, 1))
        if out is None:
            out = torch.empty((n, q.shape[1], q.shape[3]), dtype=q.dtype, device=q.device)
        merge_attention_into(out, *parts)
        return out

    def _sequence(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                  scale: float, out: torch.Tensor | None) -> torch.Tensor | None:
        """One sequence's ``n`` new queries over ``prefix + n`` keys, causally -> ``[n, Hq,
        D]`` (into ``out``, or anywhere with ``out`` None, as :meth:`_cudnn_sequence`); None
        (``out`` untouched) when no fused kernel takes it."""
        cudnn_allowed = self.cudnn_chunks if prefix else self.cudnn_prompts
        if cudnn_allowed:
            done = self._cudnn_sequence(q, k, v, prefix, scale, out)
            if done is not None:
                return done
        if prefix:
            return None
        o = self._flash_causal(q, k, v, scale)
        return None if o is None else _into(out, o[0].transpose(0, 1))

    def warm_up(self, max_context_len: int, chunk_size: int) -> str | None:
        """Build the cuDNN plans of :func:`warm_up_extends` by running each extend's calls on
        zero tensors laid out as :meth:`extend` lays out a gathered sequence. Nothing (None)
        off CUDA, for an fp32 model or an fp8 cache, or with the knob off; stops at the first
        extend cuDNN refuses or at an out-of-memory error, saying so."""
        c = self.config
        if (not self.warm_up_plans or c.device.type != self.fused_device_type
                or c.cache_dtype != c.dtype
                or c.dtype not in (torch.bfloat16, torch.float16)):
            return None
        extends = warm_up_extends(max_context_len, chunk_size)
        if not extends:
            return None
        longest = max(p + n for p, n in extends)
        deepest = max(p for p, _ in extends)
        done, stopped = 0, ""
        try:
            with torch.inference_mode():
                kv = torch.zeros((2, longest, c.num_kv_heads, c.head_size), dtype=c.dtype,
                                 device=c.device)
                q, out = torch.zeros((2, chunk_size, c.num_q_heads, c.head_size),
                                     dtype=c.dtype, device=c.device)
                for prefix, new in extends:
                    k, v = (t[:prefix + new].transpose(0, 1)[None] for t in kv)
                    q_seq = q[:new].transpose(0, 1)[None]
                    if self._cudnn_sequence(q_seq, k, v, prefix, 1.0, out[:new]) is None:
                        stopped = f"; stopped: cuDNN refuses {new} tokens on {prefix}"
                        break
                    done += 1
        except torch.OutOfMemoryError:
            stopped = f"; stopped at {done} of {len(extends)}: out of memory"
        finally:
            kv = q = out = None
            torch.cuda.empty_cache()
        return (f"cuDNN plans of {done} long extends (chunks of {chunk_size} on prefixes up "
                f"to {deepest} tokens, padded prompt tails){stopped}")

    def forward_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, layer: AttentionLayer,
                         meta: AttentionMetadata,
                         prologue: AttentionPrologue) -> torch.Tensor | None:
        """Decode: :class:`TritonAttention`'s fold. An extend that takes the dense path: one
        pass writes q and k as fresh contiguous rows, normed per head and rotated
        (:func:`~heteroserve.platforms.triton.qk_norm.qk_norm_rotary_into`, any rotation
        width) or, without norms, rotated over whole heads
        (:func:`~heteroserve.platforms.triton.rotary.rotate_into`), so
        the fused kernels take each sequence's queries without :meth:`extend`'s copy of a
        strided q (a read and a write of every query, 2.9 ms of an 8k prompt's 216 ms on an
        H100, 2026-12-06 07:15), then :meth:`forward`. None otherwise (the layer runs the ops)."""
        if meta.mode is ForwardMode.DECODE:
            return super().forward_prologue(q, k, v, k_cache, v_cache, layer, meta, prologue)
        if not self.rotate_into_rows or not self._dense(q, k_cache, layer, meta):
            return None
        check_prologue(prologue, q.shape[0], self.config.head_size)
        if prologue.has_norm:
            rotated = qk_norm_rotary_into(q, k, prologue.q_norm_weight, prologue.k_norm_weight,
                                          prologue.eps, prologue.positions,
                                          prologue.cos_sin_cache, prologue.is_neox)
        else:
            rotated = rotate_into(prologue.positions, q, k, prologue.cos_sin_cache,
                                  prologue.is_neox)
        if rotated is None:
            return None
        return self.forward(rotated[0], rotated[1], v, k_cache, v_cache, layer, meta)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               layer: AttentionLayer, meta: AttentionMetadata) -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, ``[T, Hq, D]``."""
        if not self._dense(q, k_cache, layer, meta):
            return super().extend(q, k_cache, v_cache, layer, meta)
        self._check(q, k_cache, v_cache, meta)
        c = self.config
        ps = meta.page_size
        hk, d = c.num_kv_heads, c.head_size
        # one sequence: its output is the step's, taken as the kernels leave it where they can
        single = len(meta.seq_lens_cpu) == 1 and self.return_kernel_output
        out = None if single else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        flat_k, flat_v = k_cache.view(-1, hk, d), v_cache.view(-1, hk, d)
        offsets = torch.arange(ps, device=q.device)
        page_at = row_at = 0
        for seq_len, prefix in zip(meta.seq_lens_cpu, meta.prefix_lens_cpu):
            new, pages = seq_len - prefix, -(-seq_len // ps)
            table = meta.kv_page_indices[page_at:page_at + pages].to(torch.long)
            slots = (table[:, None] * ps + offsets).reshape(-1)[:seq_len]
            k_seq = flat_k.index_select(0, slots).transpose(0, 1)[None]  # [1, Hk, L, D]
            v_seq = flat_v.index_select(0, slots).transpose(0, 1)[None]
            rows = slice(row_at, row_at + new)
            # q may be a view of a fused qkv projection (rows strided past Hq * D); the
            # fused kernels take [n, Hq, D] rows (torch's layout checks refuse others)
            q_rows = q[rows].contiguous()
            done = self._sequence(q_rows.transpose(0, 1)[None], k_seq, v_seq, prefix,
                                  layer.scale, None if out is None else out[rows])
            if done is None:
                return super().extend(q, k_cache, v_cache, layer, meta)
            if out is None:
                return done
            page_at += pages
            row_at += new
        return out


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """``result [n, H, D]`` copied into ``out``; with ``out`` None, ``result`` itself where
    it is contiguous (a copy otherwise)."""
    if out is None:
        return result.contiguous()
    out.copy_(result)
    return out
