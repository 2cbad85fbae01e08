"""A CPU double of the ``torch_npu`` operators heteroserve's npu adapters call.

Each function implements the semantics torch_npu documents (op-plugin's API reference and
``op_plugin_functions.yaml``): same argument names and defaults, layout and dtype checks that
raise ``ValueError`` where the real operator rejects its input, results computed with plain
torch. Only the argument combinations heteroserve uses are implemented; anything else raises
``NotImplementedError`` so a new call site cannot silently go untested.
"""

from __future__ import annotations

import types

import torch

from heteroserve_vendor_doubles.dense import attend, gather_pages, require

_HALF = (torch.float16, torch.bfloat16)
_MAX_INT = 2147483647


def npu_fused_infer_attention_score(
        query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
        actual_seq_lengths_kv=None, dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
        quant_scale2=None, quant_offset2=None, antiquant_scale=None, antiquant_offset=None,
        key_antiquant_scale=None, key_antiquant_offset=None, value_antiquant_scale=None,
        value_antiquant_offset=None, block_table=None, query_padding_size=None,
        kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None,
        actual_shared_prefix_len=None, query_rope=None, key_rope=None,
        key_rope_antiquant_scale=None, num_heads=1, scale=1.0, pre_tokens=_MAX_INT,
        next_tokens=_MAX_INT, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0,
        value_antiquant_mode=0, softmax_lse_flag=False):
    """Paged (``block_table``) FIA in the TND and BSH layouts with sparse_mode 0 or 3."""
    unused = (pse_shift, dequant_scale1, quant_scale1, dequant_scale2, quant_scale2,
              quant_offset2, antiquant_scale, antiquant_offset, key_antiquant_scale,
              key_antiquant_offset, value_antiquant_scale, value_antiquant_offset,
              query_padding_size, kv_padding_size, key_shared_prefix, value_shared_prefix,
              actual_shared_prefix_len, query_rope, key_rope, key_rope_antiquant_scale)
    if any(u is not None for u in unused) or softmax_lse_flag:
        raise NotImplementedError("double: quantized/shared-prefix/rope/lse FIA not implemented")
    if block_table is None or pre_tokens != _MAX_INT or next_tokens != _MAX_INT:
        raise NotImplementedError("double: only paged FIA without token windows")
    require(query.dtype in _HALF, f"query dtype {query.dtype} (fp16/bf16/int8 only)")
    require(key.dtype == query.dtype and value.dtype == query.dtype, "q/k/v dtypes differ")
    require(block_table.dtype == torch.int32 and block_table.dim() == 2,
            "block_table must be int32 [B, max_blocks]")
    require(key.dim() == 3 and value.shape == key.shape,
            "paged key/value must be (blocknum, blocksize, H) in this double")
    require(block_size == key.shape[1] and block_size % 16 == 0 and 0 < block_size <= 512,
            f"block_size {block_size} must equal the cache's and be a multiple of 16 <= 512")
    kv_heads = num_key_value_heads or num_heads
    require(num_heads % kv_heads == 0, "num_heads must be a multiple of num_key_value_heads")
    head_dim = key.shape[2] // kv_heads
    require(head_dim * kv_heads == key.shape[2], "cache H is not kv_heads * head_dim")
    kv_lens = [int(x) for x in actual_seq_lengths_kv]
    batch = block_table.shape[0]
    require(len(kv_lens) == batch, "actual_seq_lengths_kv must have one length per batch row")
    require(all(0 < s <= block_table.shape[1] * block_size for s in kv_lens),
            "a KV length exceeds its block table")

    if input_layout == "TND":
        require(query.dim() == 3 and query.shape[1] == num_heads and query.shape[2] == head_dim,
                "TND query must be [T, num_heads, D]")
        ends = [int(x) for x in actual_seq_lengths]
        require(len(ends) == batch and ends == sorted(ends) and ends[-1] == query.shape[0],
                "TND actual_seq_lengths must be cumulative query ends reaching T")
        require(sparse_mode == 3, "double implements TND with sparse_mode=3 (right-down causal)")
        require(atten_mask is not None and tuple(atten_mask.shape) == (2048, 2048)
                and atten_mask.dtype in (torch.bool, torch.int8, torch.uint8),
                "sparse_mode 3 takes the compressed 2048x2048 bool/int8 mask")
        expect = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
        require(torch.equal(atten_mask.to(torch.bool).cpu(), expect),
                "sparse_mode 3 mask must be 1 strictly above the diagonal")
        starts = [0] + ends[:-1]
        out = torch.empty_like(query)
        for b in range(batch):
            q = query[starts[b]:ends[b]]
            require(q.shape[0] <= kv_lens[b], "more query rows than KV tokens")
            k = gather_pages(key, block_table[b], kv_lens[b], "BSH").view(-1, kv_heads, head_dim)
            v = gather_pages(value, block_table[b], kv_lens[b], "BSH").view(-1, kv_heads,
                                                                              head_dim)
            out[starts[b]:ends[b]] = attend(q, k, v, scale, causal=True).to(query.dtype)
        return out, torch.zeros(1)
    if input_layout == "BSH":
        require(query.dim() == 3 and query.shape[0] == batch
                and query.shape[2] == num_heads * head_dim, "BSH query must be [B, S, N*D]")
        require(query.shape[1] == 1 and sparse_mode == 0 and atten_mask is None,
                "double implements BSH for single-token decode without a mask")
        out = torch.empty_like(query)
        for b in range(batch):
            q = query[b].view(1, num_heads, head_dim)
            k = gather_pages(key, block_table[b], kv_lens[b], "BSH").view(-1, kv_heads, head_dim)
            v = gather_pages(value, block_table[b], kv_lens[b], "BSH").view(-1, kv_heads,
                                                                              head_dim)
            out[b] = attend(q, k, v, scale, causal=False).reshape(1, -1).to(query.dtype)
        return out, torch.zeros(1)
    raise NotImplementedError(f"double: input_layout {input_layout!r}")


def _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices):
    """ATB ReshapeAndCache, ND caches ``[num_blocks, block_size, kv_heads, head_size]``."""
    require(slot_indices.dtype == torch.int32 and slot_indices.dim() == 1,
            "slot_indices must be int32 [T]")
    require(key.dim() == 3 and key_cache.dim() == 4 and key_cache.shape[2:] == key.shape[1:],
            "key [T, N, D] must match key_cache [blocks, block_size, N, D]")
    require(value_cache.shape == key_cache.shape and value.shape == key.shape, "K/V shapes")
    require(key.dtype == key_cache.dtype, "cache dtype must equal the key dtype")
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    slots = slot_indices.to(torch.long)
    flat_k[slots] = key
    flat_v[slots] = value


def npu_rms_norm(self, gamma, epsilon=1e-06):
    require(gamma.shape == self.shape[-gamma.dim():], "gamma must match trailing dims")
    xf = self.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.to(torch.float32)).to(self.dtype), rstd


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    require(x1.shape == x2.shape and x1.dtype == x2.dtype == gamma.dtype,
            "x1, x2, gamma must share dtype; x1/x2 shape")
    summed = x1.to(torch.float32) + x2.to(torch.float32)
    rstd = torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + epsilon)
    y = (summed * rstd * gamma.to(torch.float32)).to(x1.dtype)
    return y, rstd, summed.to(x1.dtype)


def npu_swiglu(self, dim=-1):
    require(self.shape[dim] % 2 == 0, "swiglu dim must be even")
    a, b = self.to(torch.float32).chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(self.dtype)


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    require(rotate is None, "double: rotate matrix not implemented")
    require(self.dim() in (3, 4) and r1.dim() == self.dim() and r2.shape == r1.shape,
            "input and r1/r2 must be 3-D or 4-D")
    require(self.shape[-1] % 2 == 0 and r1.shape[-1] == self.shape[-1], "D must be even, = r1's")
    x = self.to(torch.float32)
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    elif rotary_mode == "interleave":
        require(self.dim() == 4 and r1.shape[0] == 1 and r1.shape[2] == 1,
                "interleave mode with BSND input takes 1S1D r1/r2")
        x1, x2 = x[..., ::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        raise ValueError(f"rotary_mode must be half or interleave, got {rotary_mode!r}")
    return (x * r1.to(torch.float32) + rotated * r2.to(torch.float32)).to(self.dtype)


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    require(finished is None, "double: finished rows not implemented")
    require(x.dim() == 2 and 0 < k <= min(x.shape[-1], 1024), "x [T, E], 0 < k <= E, k <= 1024")
    probs = torch.softmax(x.to(torch.float32), dim=-1)
    values, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    tokens = x.shape[0]
    row_idx = torch.arange(tokens * k, dtype=torch.int32).view(k, tokens).t().contiguous()
    return values[:, :k].to(x.dtype), idx[:, :k].to(torch.int32), row_idx


def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    require(x.dim() == 2 and expert_idx.dim() == 2 and row_idx.shape == expert_idx.shape,
            "x [N, H], row_idx and expert_idx [N, K]")
    require(row_idx.dtype == torch.int32 and expert_idx.dtype == torch.int32, "int32 indices")
    rows, k = expert_idx.shape
    order = torch.sort(expert_idx.reshape(-1).to(torch.long), stable=True)[1]
    expanded_expert_idx = expert_idx.reshape(-1)[order]
    dst_to_src = row_idx.reshape(-1)[order].to(torch.long)
    expanded_row_idx = torch.empty(rows * k, dtype=torch.int32)
    expanded_row_idx[dst_to_src] = torch.arange(rows * k, dtype=torch.int32)
    active = min(active_num, rows) * k
    return x[dst_to_src[:active] % rows], expanded_row_idx, expanded_expert_idx


def npu_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert):
    s = sorted_expert_for_source_row
    require(s.dtype == torch.int32 and s.dim() == 1 and bool((s[1:] >= s[:-1]).all()),
            "sorted_expert_for_source_row must be non-decreasing int32 [N]")
    return torch.searchsorted(s, torch.arange(num_expert, dtype=torch.int32),
                              right=True).to(torch.int32)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None,
                       activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None):
    """Single-tensor m-axis grouping (``split_item`` 2/3, ``group_type`` 0), unquantized."""
    quant = (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale,
             activation_input, activation_quant_scale, activation_quant_offset)
    if any(q is not None for q in quant) or act_type:
        raise NotImplementedError("double: quantized / fused-activation grouped matmul")
    require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)),
            "x and weight are lists of tensors")
    require(len(x) == 1 and len(weight) == 1 and split_item in (2, 3) and group_type == 0,
            "double implements one x [M, K], one weight [E, K, N], split_item 2/3, group_type 0")
    a, w = x[0], weight[0]
    require(w.dim() == 3 and a.dim() == 2 and a.shape[1] == w.shape[1], "x [M, K], w [E, K, N]")
    require(group_list is not None and group_list.dtype == torch.int64
            and group_list.shape == (w.shape[0],), "group_list must be int64 [E]")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list[:1] * 0)
    require(group_list_type in (0, 1) and bool((counts >= 0).all()), "group_list_type 0 or 1")
    require(int(counts.sum()) <= a.shape[0], "group_list covers more rows than x has")
    out = torch.zeros(a.shape[0], w.shape[2], dtype=output_dtype or a.dtype)
    start = 0
    for e, n in enumerate(counts.tolist()):
        out[start:start + n] = (a[start:start + n].to(torch.float32)
                                @ w[e].to(torch.float32)).to(out.dtype)
        start += n
    return [out]


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
                             expanded_src_to_dst_row, export_for_source_row, drop_pad_mode=0):
    require(drop_pad_mode == 0, "double implements drop_pad_mode 0 (no drop, column order)")
    require(scales is not None and scales.dtype == expanded_permuted_rows.dtype,
            "scales must have expanded_permuted_rows' dtype")
    rows, k = scales.shape
    idx = expanded_src_to_dst_row.to(torch.long).view(k, rows).t()
    picked = expanded_permuted_rows.to(torch.float32)[idx]  # [rows, k, H]
    if bias is not None:
        picked = picked + bias.to(torch.float32)[export_for_source_row.to(torch.long)]
    out = (picked * scales.to(torch.float32)[..., None]).sum(1)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.to(torch.float32)
    return out.to(expanded_permuted_rows.dtype)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None):
    require(smooth_scales is None and group_index is None and dst_type in (None, torch.int8),
            "double implements plain per-token int8")
    require(input.dtype in _HALF and input.dim() > 1, "x must be fp16/bf16 with dim > 1")
    xf = input.to(torch.float32)
    scale = xf.abs().amax(-1) / 127.0
    q = torch.round(xf / scale.clamp(min=1e-12)[..., None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                     output_dtype=None, x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None,
                     scale_dtype=None, group_sizes=None, y_scale=None):
    require(x1.dtype == torch.int8 and x2.dtype == torch.int8, "double implements int8 x int8")
    require(x1.shape[-1] == x2.shape[0] and x2.dim() == 2, "x1 [M, K], x2 [K, N]")
    require(offset is None and group_sizes is None, "double: no offset / group quantization")
    require(scale.dim() == 1 and scale.shape[0] in (1, x2.shape[1]), "scale must be [1] or [N]")
    if output_dtype == torch.bfloat16:
        require(scale.dtype in (torch.float32, torch.bfloat16), "bf16 output: fp32/bf16 scale")
    elif output_dtype == torch.float16:
        require(scale.dtype == torch.float32 and pertoken_scale is not None,
                "fp16 output with per-token scale needs fp32 scale")
    else:
        raise NotImplementedError(f"double: output_dtype {output_dtype}")
    acc = x1.to(torch.float64) @ x2.to(torch.float64)
    y = acc * scale.to(torch.float64)
    if pertoken_scale is not None:
        require(pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (x1.shape[0],),
                "pertoken_scale must be fp32 [M]")
        y = y * pertoken_scale.to(torch.float64)[:, None]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(output_dtype)


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Double-private packing (the real layout is opaque to heteroserve): two's-complement
    nibble ``j`` of word ``w`` holds column ``8w + j``."""
    nib = (values.to(torch.int64) & 0xF).view(values.shape[0], -1, 8)
    words = (nib << (torch.arange(8) * 4)).sum(-1)
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)


def _unpack_int4(words: torch.Tensor) -> torch.Tensor:
    nib = (words.to(torch.int64)[..., None] >> (torch.arange(8) * 4)) & 0xF
    return torch.where(nib >= 8, nib - 16, nib).reshape(words.shape[0], -1)


def npu_convert_weight_to_int4pack(weight, inner_k_tiles=0):
    require(weight.dtype == torch.int32 and weight.dim() == 2 and weight.shape[1] % 8 == 0,
            "weight must be int32 [k, n] with n % 8 == 0")
    require(bool(((weight >= -8) & (weight <= 7)).all()), "values must lie in int4's [-8, 7]")
    return _pack_int4(weight)


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
                                 quant_scale=None, quant_offset=None, bias=None,
                                 antiquant_group_size=0, inner_precise=0, weight_dtype=None):
    require(quant_scale is None and quant_offset is None, "double: no output quantization")
    require(x.dtype in _HALF and x.dim() == 2, "x must be fp16/bf16 [M, K]")
    w = _unpack_int4(weight) if weight.dtype == torch.int32 else weight.to(torch.int64)
    k_dim, n = w.shape
    require(x.shape[1] == k_dim, f"x has K={x.shape[1]}, weight K={k_dim}")
    require(antiquant_scale.dtype == x.dtype, "antiquant_scale must have x's dtype")
    if antiquant_group_size:
        g = antiquant_group_size
        require(g % 32 == 0 and 32 <= g <= k_dim - 1, "group size must be a multiple of 32 in "
                                                       "[32, K-1]")
        require(antiquant_scale.shape == (-(-k_dim // g), n), "pergroup scale (ceil(K/G), N)")
        rows = torch.arange(k_dim) // g
    else:
        require(antiquant_scale.shape in ((n,), (1, n), (1,), (1, 1)),
                "perchannel scale (N,)/(1, N) or pertensor (1,)")
        rows = torch.zeros(k_dim, dtype=torch.long)
    scale = antiquant_scale.to(torch.float32).reshape(-1, antiquant_scale.shape[-1])
    off = torch.zeros_like(scale)
    if antiquant_offset is not None:
        require(antiquant_offset.shape == antiquant_scale.shape, "offset shape must equal scale's")
        off = antiquant_offset.to(torch.float32).reshape(scale.shape)
    deq = (w.to(torch.float32) + off[rows]) * scale[rows]
    y = x.to(torch.float32) @ deq
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        require(bias.dtype == want, f"bias must be {want} for {x.dtype} x")
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def npu_top_k_top_p(logits, p, k):
    require(logits.dim() == 2 and p.dtype == logits.dtype and k.dtype == torch.int32,
            "logits [B, V]; p in logits' dtype; k int32")
    require(bool(((k >= 1) & (k <= 1024)).all()) and int(k.max()) <= logits.shape[1],
            "k must lie in [1, 1024] and not exceed V")
    values, index = torch.sort(logits, dim=-1, descending=False, stable=True)
    vocab = logits.shape[1]
    kth = values.gather(1, (vocab - k.to(torch.long))[:, None])
    values = values.masked_fill(values < kth, float("-inf"))
    cum = torch.softmax(values.to(torch.float32), dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p.to(torch.float32))[:, None]
    drop[:, -1] = False
    values = values.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, index, values)


def build() -> types.ModuleType:
    """A fresh ``torch_npu`` double module (not registered anywhere)."""
    module = types.ModuleType("torch_npu")
    module.__doc__ = __doc__
    for name, value in list(globals().items()):
        if name.startswith("npu_") or name.startswith("_npu_"):
            setattr(module, name, value)
    module.__heteroserve_double__ = True
    return module
