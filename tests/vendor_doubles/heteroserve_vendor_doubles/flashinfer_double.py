"""A CPU double of the ``flashinfer`` calls heteroserve's cuda adapters make.

Signatures follow flashinfer 0.7's documented Python API: the batch paged wrappers
(``BatchDecodeWithPagedKVCacheWrapper``, ``BatchPrefillWithPagedKVCacheWrapper``: constructor,
``plan``, ``run``), ``flashinfer.norm.rmsnorm`` / ``fused_add_rmsnorm`` and ``flashinfer.mla``
(``BatchMLAPagedAttentionWrapper``, ``MLAPlanMetadata``: :mod:`.flashinfer_mla_double`). Page
tables are CSR (``indptr [B+1]``, ``indices``, ``last_page_len [B]`` with
``1 <= last <= page_size``); ``window_left = w`` lets a query at position ``p`` see keys
``p - w .. p``; prefill with ``causal=True`` aligns the mask to the end of each sequence's KV.
Checks raise ``ValueError`` where flashinfer rejects its input, ``NotImplementedError`` for
options heteroserve does not use (custom masks, RoPE inside the kernel, prefill CUDA-graph
buffers); results are plain torch.

CUDA-graph decode (``use_cuda_graph=True`` with the three page-table buffers): the batch size
is the buffers' and fixed; ``plan`` copies the page table into the buffers; ``run`` reads it
back from the buffers, as a replayed graph does, and raises when it no longer matches what
was planned (a real replay would then run with a stale split plan).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from heteroserve_vendor_doubles import flashinfer_gemm_double, flashinfer_mla_double
from heteroserve_vendor_doubles.dense import attend, gather_pages, require

_HALF = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128, 256)
_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(value: Any) -> torch.dtype:
    return _NAMES.get(value, value) if isinstance(value, str) else value


def _int32_vector(t: torch.Tensor, what: str) -> list[int]:
    require(t.dtype == torch.int32 and t.dim() == 1, f"{what} must be a 1-D int32 tensor")
    return [int(v) for v in t.cpu()]


class _Plan:
    """What ``plan`` fixed: the CSR page table and the attention options."""

    def __init__(self, qo: list[int], indptr: list[int], indices: torch.Tensor,
                 last: list[int], heads: tuple[int, int, int], page_size: int,
                 options: dict[str, Any]) -> None:
        hq, hk, d = heads
        require(hq % hk == 0, f"num_qo_heads {hq} is not a multiple of num_kv_heads {hk}")
        require(d in _HEAD_DIMS, f"head_dim {d} not in {_HEAD_DIMS}")
        require(len(indptr) == len(last) + 1 and indptr[0] == 0, "indptr has batch_size + 1 entries")
        require(all(1 <= n <= page_size for n in last), "1 <= last_page_len <= page_size")
        require(indptr[-1] <= indices.numel(), "indices hold fewer pages than indptr says")
        q_dtype = _dtype(options["q_data_type"])
        kv_dtype = _dtype(options["kv_data_type"] or q_dtype)
        require(q_dtype in _HALF and kv_dtype in _HALF, "q/kv data types must be fp16 or bf16")
        if options["pos_encoding_mode"] != "NONE" or options["rope_scale"] is not None \
                or options["rope_theta"] is not None:
            raise NotImplementedError("double: RoPE inside the kernel is not used by heteroserve")
        self.qo, self.indptr, self.last = qo, indptr, last
        self.indices = indices.to(torch.int64).cpu()
        self.heads, self.page_size = heads, page_size
        self.q_dtype, self.kv_dtype = q_dtype, kv_dtype
        cap = options["logits_soft_cap"]
        self.soft_cap = float(cap) if cap else 0.0
        self.scale = options["sm_scale"] if options["sm_scale"] is not None else d ** -0.5
        self.window_left = options["window_left"]

    def kv(self, b: int, cache: torch.Tensor, layout: str) -> torch.Tensor:
        pages = self.indices[self.indptr[b]:self.indptr[b + 1]]
        length = (len(pages) - 1) * self.page_size + self.last[b]
        return gather_pages(cache.cpu(), pages, length, layout)

    def run(self, q: torch.Tensor, paged_kv_cache: Any, layout: str, causal: bool
            ) -> torch.Tensor:
        hq, hk, d = self.heads
        require(q.dim() == 3 and tuple(q.shape[1:]) == (hq, d), f"q must be [T, {hq}, {d}]")
        require(q.shape[0] == self.qo[-1], f"q has {q.shape[0]} rows, the plan {self.qo[-1]}")
        require(q.dtype == self.q_dtype, f"q is {q.dtype}, the plan says {self.q_dtype}")
        require(isinstance(paged_kv_cache, tuple) and len(paged_kv_cache) == 2,
                "double: paged_kv_cache as a (k_cache, v_cache) tuple")
        k_cache, v_cache = paged_kv_cache
        page_axis = 1 if layout == "NHD" else 2
        for cache in (k_cache, v_cache):
            require(cache.dim() == 4 and cache.shape[page_axis] == self.page_size,
                    f"{layout} cache with pages of {self.page_size}")
            require(cache.dtype == self.kv_dtype, f"cache is {cache.dtype}, plan {self.kv_dtype}")
        out = torch.empty(q.shape, dtype=q.dtype)
        for b in range(len(self.last)):
            lo, hi = self.qo[b], self.qo[b + 1]
            k, v = self.kv(b, k_cache, layout), self.kv(b, v_cache, layout)
            require(k.shape[1] == hk, f"cache has {k.shape[1]} KV heads, the plan {hk}")
            out[lo:hi] = attend(q[lo:hi].cpu(), k, v, self.scale, causal=causal,
                                window_left=self.window_left,
                                soft_cap=self.soft_cap).to(q.dtype)
        return out.to(q.device)


class _Wrapper:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, **buffers: Any) -> None:
        require(float_workspace_buffer.dtype == torch.uint8, "workspace must be uint8")
        require(kv_layout in ("NHD", "HND"), f"kv_layout {kv_layout!r}")
        if not use_cuda_graph and any(v is not None for v in buffers.values()):
            raise NotImplementedError("double: page-table buffers only with use_cuda_graph")
        self._layout = kv_layout
        self._plan: _Plan | None = None
        self._causal = False  # prefill's plan(causal=...) sets it; decode attends to all KV
        self._graph: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if use_cuda_graph:
            self._graph = self._graph_buffers(**buffers)

    def _graph_buffers(self, **buffers: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError("double: CUDA-graph mode is used for decode only")

    def _fill_graph_buffers(self, indptr: list[int], indices: torch.Tensor,
                            last: list[int]) -> None:
        if self._graph is None:
            return
        buf_indptr, buf_indices, buf_last = self._graph
        require(len(last) == buf_last.numel(), f"CUDA-graph batch size is {buf_last.numel()}, "
                                               f"plan got {len(last)}")
        require(indices.numel() <= buf_indices.numel(), "indices exceed the indices buffer")
        buf_indptr.copy_(torch.tensor(indptr, dtype=torch.int32))
        if indices.data_ptr() != buf_indices.data_ptr():
            buf_indices[: indices.numel()].copy_(indices)
        buf_last.copy_(torch.tensor(last, dtype=torch.int32))

    def _replayed_plan(self) -> _Plan:
        """The plan, checked against the page table the graph buffers hold now."""
        plan = self._plan
        assert plan is not None and self._graph is not None
        buf_indptr, buf_indices, buf_last = self._graph
        stale = (buf_indptr.cpu().tolist() != plan.indptr or buf_last.cpu().tolist() != plan.last
                 or not torch.equal(buf_indices.cpu().to(torch.int64)[: plan.indptr[-1]],
                                    plan.indices[: plan.indptr[-1]]))
        require(not stale, "the graph buffers hold another page table than the plan: plan() "
                           "must run before every replay")
        return plan

    def run(self, q: torch.Tensor, paged_kv_cache: Any, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False) -> torch.Tensor:
        """Attention of ``q`` over the planned pages of ``paged_kv_cache``, in ``q.dtype``."""
        if out is not None or lse is not None or return_lse:
            raise NotImplementedError("double: out / lse are not used by heteroserve")
        require(self._plan is not None, "run() before plan()")
        plan = self._replayed_plan() if self._graph is not None else self._plan
        return plan.run(q, paged_kv_cache, self._layout,  # type: ignore[union-attr]
                        causal=self._causal)


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    """One query per request over its paged KV (``use_tensor_cores`` picks a kernel, not a
    result)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, use_tensor_cores: bool = False,
                 paged_kv_indptr_buffer: torch.Tensor | None = None,
                 paged_kv_indices_buffer: torch.Tensor | None = None,
                 paged_kv_last_page_len_buffer: torch.Tensor | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph,
                         indptr=paged_kv_indptr_buffer, indices=paged_kv_indices_buffer,
                         last=paged_kv_last_page_len_buffer)
        self.use_tensor_cores = use_tensor_cores

    def _graph_buffers(self, indptr: torch.Tensor | None = None,
                       indices: torch.Tensor | None = None,
                       last: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        require(indptr is not None and indices is not None and last is not None,
                "use_cuda_graph needs the indptr, indices and last_page_len buffers")
        for t in (indptr, indices, last):
            require(t.dtype == torch.int32 and t.dim() == 1, "page-table buffers are 1-D int32")
        require(indptr.numel() == last.numel() + 1, "indptr buffer has batch_size + 1 entries")
        return indptr, indices, last

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             pos_encoding_mode: str = "NONE", window_left: int = -1,
             logits_soft_cap: float | None = None, q_data_type: Any = "float16",
             kv_data_type: Any = None, data_type: Any = None, sm_scale: float | None = None,
             rope_scale: float | None = None, rope_theta: float | None = None,
             non_blocking: bool = True) -> None:
        kv_ptr = _int32_vector(indptr, "indptr")
        last = _int32_vector(last_page_len, "last_page_len")
        require(indices.dtype == torch.int32, "indices must be int32")
        self._fill_graph_buffers(kv_ptr, indices, last)
        self._plan = _Plan(
            list(range(len(last) + 1)), kv_ptr, indices, last,
            (num_qo_heads, num_kv_heads, head_dim), page_size,
            dict(pos_encoding_mode=pos_encoding_mode, window_left=window_left,
                 logits_soft_cap=logits_soft_cap, q_data_type=data_type or q_data_type,
                 kv_data_type=kv_data_type, sm_scale=sm_scale, rope_scale=rope_scale,
                 rope_theta=rope_theta))


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    """Ragged queries (``qo_indptr``) over each request's paged KV."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: torch.Tensor | None = None,
                 paged_kv_indptr_buf: torch.Tensor | None = None,
                 paged_kv_indices_buf: torch.Tensor | None = None,
                 paged_kv_last_page_len_buf: torch.Tensor | None = None,
                 custom_mask_buf: torch.Tensor | None = None,
                 mask_indptr_buf: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph,
                         qo=qo_indptr_buf, indptr=paged_kv_indptr_buf,
                         indices=paged_kv_indices_buf, last=paged_kv_last_page_len_buf,
                         mask=custom_mask_buf, mask_indptr=mask_indptr_buf)

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor,
             paged_kv_indices: torch.Tensor, paged_kv_last_page_len: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int,
             head_dim_vo: int | None = None, custom_mask: torch.Tensor | None = None,
             packed_custom_mask: torch.Tensor | None = None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type: Any = "float16",
             kv_data_type: Any = None, non_blocking: bool = True) -> None:
        if custom_mask is not None or packed_custom_mask is not None:
            raise NotImplementedError("double: custom masks are not used by heteroserve")
        require(head_dim_vo in (None, head_dim_qk), "double: head_dim_vo equals head_dim_qk")
        qo = _int32_vector(qo_indptr, "qo_indptr")
        kv_ptr = _int32_vector(paged_kv_indptr, "paged_kv_indptr")
        last = _int32_vector(paged_kv_last_page_len, "paged_kv_last_page_len")
        require(paged_kv_indices.dtype == torch.int32, "paged_kv_indices must be int32")
        require(len(qo) == len(kv_ptr) and qo[0] == 0, "qo_indptr has batch_size + 1 entries")
        self._causal = causal
        self._plan = _Plan(
            qo, kv_ptr, paged_kv_indices, last, (num_qo_heads, num_kv_heads, head_dim_qk),
            page_size,
            dict(pos_encoding_mode=pos_encoding_mode, window_left=window_left,
                 logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
                 kv_data_type=kv_data_type, sm_scale=sm_scale, rope_scale=rope_scale,
                 rope_theta=rope_theta))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
            out: torch.Tensor | None = None, enable_pdl: bool | None = None) -> torch.Tensor:
    """``input [N, H]`` (fp16/bf16) -> ``input / rms * weight`` in ``input.dtype``."""
    require(input.dim() == 2 and weight.shape == input.shape[1:], "input [N, H], weight [H]")
    require(input.dtype in _HALF and weight.dtype == input.dtype, "fp16/bf16, weight like input")
    x = input.float()
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(input.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float = 1e-6, enable_pdl: bool | None = None) -> None:
    """In place: ``residual += input`` (in the residual's dtype), then ``input =
    rmsnorm(residual) * weight``."""
    require(input.shape == residual.shape and input.dtype == residual.dtype,
            "input and residual alike")
    residual.copy_((residual.float() + input.float()).to(residual.dtype))
    input.copy_(rmsnorm(residual, weight, eps))


def build() -> dict[str, types.ModuleType]:
    """The double modules by name: ``flashinfer``, ``flashinfer.norm``, ``flashinfer.mla``
    and ``flashinfer.gemm`` (:mod:`.flashinfer_gemm_double`)."""
    top = types.ModuleType("flashinfer")
    norm = types.ModuleType("flashinfer.norm")
    norm.rmsnorm, norm.fused_add_rmsnorm = rmsnorm, fused_add_rmsnorm
    mla = flashinfer_mla_double.build()
    top.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    top.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    top.BatchMLAPagedAttentionWrapper = mla.BatchMLAPagedAttentionWrapper
    gemm = flashinfer_gemm_double.build()
    top.norm, top.mla, top.gemm = norm, mla, gemm["flashinfer.gemm"]
    top.__version__ = "0.7.2-double"
    top.__path__ = []  # a package, so ``from flashinfer.norm import ...`` resolves
    for module in (top, norm):
        module.__heteroserve_double__ = True
    return {"flashinfer": top, "flashinfer.norm": norm, "flashinfer.mla": mla, **gemm}
