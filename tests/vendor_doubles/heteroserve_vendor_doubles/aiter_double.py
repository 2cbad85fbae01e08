"""A CPU double of the ``aiter`` functions heteroserve's rocm adapters call.

Signatures follow aiter's Python API (``aiter/ops/*.py``, ``aiter/fused_moe.py``); layout and
dtype checks raise ``ValueError`` where the kernels would reject their input; results are plain
torch. ``dtypes.fp8`` is ``float8_e4m3fnuz`` (an MI300, gfx942) unless a test changes it.
"""

from __future__ import annotations

import enum
import types

import torch

from heteroserve_vendor_doubles.dense import attend, gather_pages, require

_HALF = (torch.float16, torch.bfloat16)


class ActivationType(enum.IntEnum):
    No = -1
    Silu = 0
    Gelu = 1


class QuantType(enum.IntEnum):
    No = 0
    per_Tensor = 1
    per_Token = 2


def reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                            k_scale, v_scale, kv_layout=-1):
    """Flash layout caches ``[num_blocks, block_size, num_heads, head_size]``."""
    require(kv_cache_dtype == "auto", "double implements kv_cache_dtype='auto'")
    require(slot_mapping.dtype == torch.int64, "slot_mapping must be int64")
    require(key_cache.dim() == 4 and key_cache.shape[2:] == key.shape[1:],
            "key [T, H, D] vs key_cache [blocks, block_size, H, D]")
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    keep = slot_mapping >= 0  # negative slots are skipped by the kernel
    flat_k[slot_mapping[keep]] = key[keep].to(key_cache.dtype)
    flat_v[slot_mapping[keep]] = value[keep].to(value_cache.dtype)


def paged_attention_ragged(out, workspace_buffer, query, key_cache, value_cache, scale,
                           kv_indptr, kv_page_indices, kv_last_page_lens, block_size,
                           max_num_partitions, alibi_slopes, kv_cache_dtype, kv_cache_layout,
                           logits_soft_cap, k_scale, v_scale, fp8_out_scale=None,
                           partition_size=256, mtp=1):
    require(alibi_slopes is None and fp8_out_scale is None and kv_cache_dtype == "auto",
            "double: no alibi, fp8 output or quantized cache")
    require(query.dtype in _HALF and out.shape == query.shape, "fp16/bf16 query, out like query")
    require(kv_cache_layout in ("NHD", "HND"), f"kv_cache_layout {kv_cache_layout!r}")
    page_axis = 2 if kv_cache_layout == "HND" else 1
    require(key_cache.shape[page_axis] == block_size, "block_size must match the cache")
    require(partition_size % block_size == 0, "partition_size must be a multiple of block_size")
    for t in (kv_indptr, kv_page_indices, kv_last_page_lens):
        require(t.dtype == torch.int32, "kv_indptr / kv_page_indices / kv_last_page_lens int32")
    batch, heads, head_size = query.shape
    pages = (kv_indptr[1:] - kv_indptr[:-1]).tolist()
    lens = [(n - 1) * block_size + int(last) for n, last in zip(pages, kv_last_page_lens)]
    require(max_num_partitions >= -(-max(lens) // partition_size), "too few partitions")
    need = batch * heads * max_num_partitions * (head_size * query.element_size() + 8)
    require(workspace_buffer.dtype == torch.uint8 and workspace_buffer.numel() >= need,
            f"workspace_buffer needs {need} bytes")
    for b in range(batch):
        ids = kv_page_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])]
        k = gather_pages(key_cache, ids, lens[b], kv_cache_layout)
        v = gather_pages(value_cache, ids, lens[b], kv_cache_layout)
        out[b] = attend(query[b:b + 1], k, v, scale, causal=False,
                        soft_cap=logits_soft_cap)[0].to(out.dtype)
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           min_seqlen_q=0, dropout_p=0.0, softmax_scale=None,
                           logits_soft_cap=0.0, causal=False, window_size=(-1, -1, 0),
                           bias=None, alibi_slopes=None, deterministic=False, return_lse=False,
                           return_attn_probs=False, how_v3_bf16_cvt=1, block_table=None,
                           out=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None,
                           sink_ptr=None):
    """Contiguous varlen attention; causal aligned bottom-right; window (left, right)."""
    require(dropout_p == 0.0 and bias is None and alibi_slopes is None and block_table is None
            and not return_lse and not return_attn_probs, "double: plain varlen forward only")
    require(q.dtype in _HALF and k.dtype == q.dtype == v.dtype, "fp16/bf16 q/k/v")
    require(cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32,
            "cu_seqlens must be int32")
    left, right = window_size[0], window_size[1]
    require(right in (-1, 0) or not causal, "double: causal windows have right <= 0")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    require(max(b - a for a, b in zip(cq, cq[1:])) <= max_seqlen_q, "max_seqlen_q too small")
    require(max(b - a for a, b in zip(ck, ck[1:])) <= max_seqlen_k, "max_seqlen_k too small")
    result = torch.empty_like(q) if out is None else out
    for b in range(len(cq) - 1):
        result[cq[b]:cq[b + 1]] = attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]],
                                         v[ck[b]:ck[b + 1]], scale, causal=causal,
                                         window_left=left, soft_cap=logits_soft_cap
                                         ).to(q.dtype)
    return result


def rms_norm(input, weight, epsilon, use_model_sensitive_rmsnorm=0):
    xf = input.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon) * weight.to(torch.float32)
    return y.to(input.dtype)


def rmsnorm2d_fwd_with_add(out, input, residual_in, residual_out, weight, epsilon,
                           gemma_norm=False, use_model_sensitive_rmsnorm=0):
    require(not gemma_norm, "double: gemma_norm not implemented")
    require(out.shape == input.shape == residual_in.shape == residual_out.shape, "shapes")
    summed = input.to(torch.float32) + residual_in.to(torch.float32)
    residual_out.copy_(summed.to(residual_out.dtype))
    out.copy_(rms_norm(summed, weight, epsilon).to(out.dtype))


def silu_and_mul(out, input, limit=0.0):
    require(limit == 0.0, "double: no clamp limit")
    require(out.shape[-1] * 2 == input.shape[-1] and out.dtype == input.dtype, "out [T, I]")
    a, b = input.to(torch.float32).chunk(2, dim=-1)
    out.copy_((torch.nn.functional.silu(a) * b).to(out.dtype))


def rotary_embedding_fwd(positions, query, key, head_size, cos_cache, sin_cache, is_neox,
                         is_nope_first):
    """In place on ``query [T, Hq, head_size]`` and ``key [T, Hk, head_size]``."""
    require(not is_nope_first, "double implements rope-first heads")
    require(cos_cache.shape == sin_cache.shape and cos_cache.dtype == query.dtype,
            "cos/sin caches [max_pos, rot/2] in the query dtype")
    require(query.shape[-1] == head_size and key.shape[-1] == head_size, "head_size mismatch")
    half = cos_cache.shape[1]
    cos = cos_cache[positions.to(torch.long)].to(torch.float32)[:, None, :]
    sin = sin_cache[positions.to(torch.long)].to(torch.float32)[:, None, :]
    for x in (query, key):
        r = x[..., :2 * half].to(torch.float32)
        if is_neox:
            a, b = r[..., :half], r[..., half:]
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
        else:
            a, b = r[..., 0::2], r[..., 1::2]
            rot = torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)
        x[..., :2 * half] = rot.to(x.dtype)


def topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output, need_renorm,
                 num_shared_experts=0, shared_expert_scoring_func=""):
    require(topk_weights.dtype == torch.float32 and topk_indices.dtype == torch.int32,
            "topk_weights fp32, topk_indices int32")
    k = topk_weights.shape[1]
    probs = torch.softmax(gating_output.to(torch.float32), -1)
    values, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    values = values[:, :k]
    if need_renorm:
        values = values / values.sum(-1, keepdim=True)
    topk_weights.copy_(values)
    topk_indices.copy_(idx[:, :k].to(torch.int32))
    tokens = gating_output.shape[0]
    token_expert_indices.copy_(torch.arange(tokens * k, dtype=torch.int32).view(k, tokens).t())


def _fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None,
               activation=ActivationType.Silu, quant_type=QuantType.No, doweight_stage1=False,
               w1_scale=None, w2_scale=None, a1_scale=None, a2_scale=None, **tuning):
    require(quant_type == QuantType.No and activation == ActivationType.Silu,
            "double implements unquantized SiLU experts")
    require(expert_mask is None and not doweight_stage1, "double: no EP mask / stage-1 weights")
    require(topk_ids.dtype == torch.int32 and topk_weight.dtype == torch.float32,
            "topk_ids int32, topk_weight fp32")
    require(w1.shape[1] == 2 * w2.shape[2] and w1.shape[2] == hidden_states.shape[1],
            "w1 [E, 2I, H], w2 [E, H, I]")
    x = hidden_states.to(torch.float32)
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            h = w1[e].to(torch.float32) @ x[t]
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += topk_weight[t, j] * (w2[e].to(torch.float32) @ act)
    return out.to(hidden_states.dtype)


def pertoken_quant(x, scale=None, x_scale=None, scale_dtype=torch.float32,
                   quant_dtype=torch.int8, dtypeMax=None):
    require(scale is None and x_scale is None, "double: dynamic, no smoothing")
    xf = x.to(torch.float32)
    dmax = dtypeMax or (127.0 if quant_dtype == torch.int8 else torch.finfo(quant_dtype).max)
    s = (xf.abs().amax(-1, keepdim=True) / dmax).clamp(min=1e-12)
    y = (xf / s).clamp(-dmax, dmax)
    y = torch.round(y).to(quant_dtype) if quant_dtype == torch.int8 else y.to(quant_dtype)
    return y, s.to(scale_dtype)


def gemm_a8w8(XQ, WQ, x_scale, w_scale, bias=None, dtype=torch.bfloat16, splitK=None):
    require(XQ.dtype == WQ.dtype and XQ.dtype in (torch.int8, torch.float8_e4m3fn,
                                                   torch.float8_e4m3fnuz),
            "XQ and WQ must both be int8 or both the device's fp8")
    require(XQ.shape[1] == WQ.shape[1], "XQ [M, K], WQ [N, K]")
    require(x_scale.shape == (XQ.shape[0], 1) and w_scale.shape == (WQ.shape[0], 1),
            "x_scale [M, 1], w_scale [N, 1]")
    require(dtype in _HALF, "output dtype bf16/fp16")
    y = (XQ.to(torch.float64) * x_scale.to(torch.float64)) @ \
        (WQ.to(torch.float64) * w_scale.to(torch.float64)).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(dtype)


def build() -> dict[str, types.ModuleType]:
    """Fresh ``aiter``, ``aiter.fused_moe`` and ``aiter.dtypes`` double modules."""
    aiter = types.ModuleType("aiter")
    aiter.__doc__ = __doc__
    for fn in (reshape_and_cache_flash, paged_attention_ragged, flash_attn_varlen_func,
               rms_norm, rmsnorm2d_fwd_with_add, silu_and_mul, rotary_embedding_fwd, topk_softmax,
               pertoken_quant, gemm_a8w8):
        setattr(aiter, fn.__name__, fn)
    aiter.ActivationType, aiter.QuantType = ActivationType, QuantType
    fused = types.ModuleType("aiter.fused_moe")
    fused.fused_moe = _fused_moe
    dtypes = types.ModuleType("aiter.dtypes")
    dtypes.fp8 = torch.float8_e4m3fnuz
    aiter.fused_moe, aiter.dtypes = fused, dtypes
    aiter.__path__ = []  # a package, so "from aiter.fused_moe import ..." resolves
    aiter.__heteroserve_double__ = True
    return {"aiter": aiter, "aiter.fused_moe": fused, "aiter.dtypes": dtypes}
