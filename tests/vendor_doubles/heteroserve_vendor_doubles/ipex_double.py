"""A CPU double of the ``intel_extension_for_pytorch`` (IPEX) LLM APIs heteroserve's xpu
adapters call: ``ipex.llm.modules.PagedAttention`` and ``ipex.llm.functional``.

Signatures follow IPEX's ``llm/modules/mha_fusion.py`` and ``llm/functional/fusions.py``; paged
caches are ``[num_blocks, num_heads, block_size, head_size]`` as that class documents.
"""

from __future__ import annotations

import types

import torch

from heteroserve_vendor_doubles.dense import attend, gather_pages, require

_HALF = (torch.float16, torch.bfloat16)


def _check_cache(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor) -> None:
    require(query.dtype in _HALF and key_cache.dtype == query.dtype, "fp16/bf16 q and caches")
    require(key_cache.dim() == 4 and value_cache.shape == key_cache.shape
            and key_cache.shape[3] == query.shape[-1],
            "caches must be [num_blocks, num_heads, block_size, head_size]")
    require(query.shape[1] % key_cache.shape[1] == 0, "query heads must group over KV heads")
    require(block_tables.dtype == torch.int32 and block_tables.dim() == 2,
            "block_tables int32 [B, max_blocks]")


class PagedAttention:
    """``ipex.llm.modules.PagedAttention`` class methods."""

    @classmethod
    def single_query_cached_kv_attention(cls, output, query, key_cache, value_cache,
                                         head_mapping, scale, block_tables, context_lens,
                                         block_size, max_context_len, k_scale, v_scale,
                                         alibi_slopes):
        _check_cache(query, key_cache, value_cache, block_tables)
        require(alibi_slopes is None and k_scale == 1.0 and v_scale == 1.0,
                "double: no alibi / fp8 cache scales")
        require(block_size == key_cache.shape[2], "block_size must match the cache")
        heads, kv_heads = query.shape[1], key_cache.shape[1]
        expect = (torch.arange(heads) // (heads // kv_heads)).to(torch.int32)
        require(head_mapping.dtype == torch.int32 and torch.equal(head_mapping.cpu(), expect),
                "head_mapping must map query head h to KV head h // group")
        require(int(context_lens.max()) <= max_context_len, "max_context_len too small")
        for b in range(query.shape[0]):
            n = int(context_lens[b])
            k = gather_pages(key_cache, block_tables[b], n, "HND")
            v = gather_pages(value_cache, block_tables[b], n, "HND")
            output[b] = attend(query[b:b + 1], k, v, scale, causal=False)[0].to(output.dtype)

    @classmethod
    def flash_attn_varlen_func(cls, output, query, key_cache, value_cache, cu_seqlens_q,
                               cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, scale, is_cusal,
                               block_tables, k_scale, v_scale, alibi_slopes):
        _check_cache(query, key_cache, value_cache, block_tables)
        require(is_cusal, "IPEX documents is_cusal=False as unsupported")
        require(alibi_slopes is None and k_scale == 1.0 and v_scale == 1.0,
                "double: no alibi / fp8 cache scales")
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
        for b in range(len(cq) - 1):
            n = ck[b + 1] - ck[b]
            require(cq[b + 1] - cq[b] <= max_seqlen_q and n <= max_seqlen_kv, "max seqlens")
            k = gather_pages(key_cache, block_tables[b], n, "HND")
            v = gather_pages(value_cache, block_tables[b], n, "HND")
            output[cq[b]:cq[b + 1]] = attend(query[cq[b]:cq[b + 1]], k, v, scale,
                                             causal=True).to(output.dtype)


def rms_norm(hidden_states, weight, eps):
    xf = hidden_states.to(torch.float32)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(torch.float32)
    return y.to(hidden_states.dtype)


def add_rms_norm(residual, x, weight, bias, eps, add_back=False):
    require(bias is None, "double: RMSNorm bias not implemented")
    summed = x.to(torch.float32) + (residual.to(torch.float32) if residual is not None else 0)
    if residual is not None and add_back:
        residual.copy_(summed.to(residual.dtype))
    return rms_norm(summed, weight, eps).to(x.dtype)


def silu_mul(x, y, out=None):
    result = (torch.nn.functional.silu(x.to(torch.float32)) * y.to(torch.float32)).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def gelu_mul(x, y, out=None, approximate="none"):
    g = torch.nn.functional.gelu(x.to(torch.float32), approximate=approximate)
    result = (g * y.to(torch.float32)).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def rotary_embedding(query, key, sin, cos, rotary_dim, rotary_half, position_ids=None):
    """``sin``/``cos`` ``[num_tokens, rotary_dim]``; first ``rotary_dim`` dims rotate."""
    require(position_ids is None, "double: sin/cos given per token, no position_ids")
    require(sin.shape == cos.shape == (query.shape[0], rotary_dim), "sin/cos [T, rotary_dim]")
    c = cos.to(torch.float32)[:, None, :]
    s = sin.to(torch.float32)[:, None, :]
    outs = []
    for x in (query, key):
        r = x[..., :rotary_dim].to(torch.float32)
        if rotary_half:
            a, b = r.chunk(2, dim=-1)
            rotated = torch.cat((-b, a), -1)
        else:
            rotated = torch.stack((-r[..., 1::2], r[..., 0::2]), -1).flatten(-2)
        new = (r * c + rotated * s).to(x.dtype)
        outs.append(torch.cat((new, x[..., rotary_dim:]), -1))
    return outs[0], outs[1]


def build() -> dict[str, types.ModuleType]:
    """Fresh ``intel_extension_for_pytorch`` (+ ``.llm``, ``.llm.modules``,
    ``.llm.functional``) double modules."""
    root = types.ModuleType("intel_extension_for_pytorch")
    llm = types.ModuleType("intel_extension_for_pytorch.llm")
    modules = types.ModuleType("intel_extension_for_pytorch.llm.modules")
    functional = types.ModuleType("intel_extension_for_pytorch.llm.functional")
    modules.PagedAttention = PagedAttention
    for fn in (rms_norm, add_rms_norm, silu_mul, gelu_mul, rotary_embedding):
        setattr(functional, fn.__name__, fn)
    for package in (root, llm):
        package.__path__ = []
    root.llm, llm.modules, llm.functional = llm, modules, functional
    root.__heteroserve_double__ = True
    return {"intel_extension_for_pytorch": root, "intel_extension_for_pytorch.llm": llm,
            "intel_extension_for_pytorch.llm.modules": modules,
            "intel_extension_for_pytorch.llm.functional": functional}
