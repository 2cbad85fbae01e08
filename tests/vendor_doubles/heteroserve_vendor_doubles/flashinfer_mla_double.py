"""A CPU double of ``flashinfer.mla`` as heteroserve's MLA adapter calls it (flashinfer 0.7.4):
``MLAPlanMetadata.csr`` and ``BatchMLAPagedAttentionWrapper`` (constructor, ``plan`` with
canonical CSR metadata, ``run`` with split ``query=(q_nope, q_pe)`` and
``kv_cache=(ckv_cache, kpe_cache)``).

Semantics (``flashinfer/mla/_batch_mla/``): request ``b``'s queries are rows
``qo_indptr[b]:qo_indptr[b+1]``; its ``kv_len_arr[b]`` tokens sit in pages
``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` of ``ckv_cache [P, page, head_dim_ckv]`` /
``kpe_cache [P, page, head_dim_kpe]``; per head the score is ``sm_scale * (q_nope . ckv +
q_pe . kpe)`` (causal: aligned to the end of the KV), softmax, values ``ckv``; the output is
``[T, H, head_dim_ckv]`` in the query dtype with the query's strides (``empty_like``). The
plan fixes the lengths (host values); ``run`` reads the page indices from the planned
``kv_indices`` tensor, as the kernel does. Checks raise ``ValueError`` where flashinfer does
(metadata dtypes/ranks/consistency ``_planning._validate_csr_metadata``, widths and dtypes
``_fa_common._validate_generated_fa_plan`` with sm90's ``fa3`` widths, run tensors against
the plan, the kernel's 16-byte row alignment) and ``NotImplementedError`` for what
heteroserve does not use (causal plans, LSE, scales, sinks, profiler, packed layouts, the
deprecated flat arguments, non-FA backends); the math is plain torch in fp32.

CUDA-graph mode (``use_cuda_graph=True`` and all four reserved int32 buffers): ``plan``
copies the metadata into the buffers; ``run`` refuses a replay whose buffers no longer hold
what was planned (a real replay would use the stale plan's lengths).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch

from heteroserve_vendor_doubles.dense import attend, require

_HALF = (torch.float16, torch.bfloat16)
_FA3_CKV = (128, 256, 512)
_BACKENDS = ("auto", "fa2", "fa3", "autotune", "cutlass", "cutile", "trtllm-gen", "xqa",
             "cute-dsl", "cute-dsl-monolithic", "cute-dsl-modular", "cute-dsl-rubin-mtp")


@dataclass(frozen=True)
class MLAPlanMetadata:
    """Canonical metadata; heteroserve builds only the CSR form."""

    qo_indptr: torch.Tensor | None = None
    kv_indptr: torch.Tensor | None = None
    kv_indices: torch.Tensor | None = None
    kv_len_arr: torch.Tensor | None = None

    @classmethod
    def csr(cls, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
            kv_len_arr: torch.Tensor) -> MLAPlanMetadata:
        return cls(qo_indptr, kv_indptr, kv_indices, kv_len_arr)


def _vector(t: Any, name: str, device: torch.device) -> torch.Tensor:
    require(isinstance(t, torch.Tensor) and t.dim() == 1, f"{name} metadata must be rank-1")
    require(t.dtype == torch.int32, f"{name} metadata must have dtype torch.int32")
    require(t.device.type == "cpu" or t.device == device,
            f"{name} metadata must be on CPU or the wrapper device")
    require(t.is_contiguous(), f"{name} metadata must be contiguous")
    return t


def _indptr(t: torch.Tensor, name: str) -> list[int]:
    values = [int(v) for v in t.cpu()]
    require(bool(values) and values[0] == 0, f"{name} metadata must start at zero")
    require(all(a <= b for a, b in zip(values, values[1:])), f"{name} must be nondecreasing")
    return values


def _rows_aligned(t: torch.Tensor) -> bool:
    """What the kernel's 16-byte vector loads need: last dim contiguous, aligned rows."""
    size = t.element_size()
    return (t.dim() == 3 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(t.shape[d] <= 1 or (t.stride(d) * size) % 16 == 0 for d in (0, 1)))


class BatchMLAPagedAttentionWrapper:
    """Absorbed MLA over a paged latent cache (see the module docstring)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool = False,
                 qo_indptr: torch.Tensor | None = None, kv_indptr: torch.Tensor | None = None,
                 kv_indices: torch.Tensor | None = None,
                 kv_len_arr: torch.Tensor | None = None, backend: str = "auto") -> None:
        require(backend in _BACKENDS, f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend not in ("auto", "fa2", "fa3"):
            raise NotImplementedError(f"double: backend {backend!r} is not used by heteroserve")
        self.device = float_workspace_buffer.device
        self._graph: tuple[torch.Tensor, ...] | None = None
        buffers = (qo_indptr, kv_indptr, kv_indices, kv_len_arr)
        if use_cuda_graph:
            require(all(b is not None for b in buffers), "CUDA graph mode requires reserved "
                    "qo_indptr, kv_indptr, kv_indices, and kv_len_arr buffers")
            for b in buffers:
                require(b.dtype == torch.int32 and b.dim() == 1 and b.is_contiguous()
                        and b.device == self.device,
                        "CUDA graph reserved buffers are contiguous 1-D int32 on the device")
            self._graph = buffers  # type: ignore[assignment]
        self._plan: dict[str, Any] | None = None

    def plan(self, qo_indptr: Any = None, kv_indptr: Any = None, kv_indices: Any = None,
             kv_len_arr: Any = None, num_heads: int | None = None,
             head_dim_ckv: int | None = None, head_dim_kpe: int | None = None,
             page_size: int | None = None, causal: bool | None = None,
             sm_scale: float | None = None, q_data_type: torch.dtype | None = None,
             kv_data_type: torch.dtype | None = None, use_profiler: bool = False, *,
             metadata: MLAPlanMetadata | None = None, query_layout: str | None = None,
             kv_cache_layout: str | None = None, lse_mode: str = "none",
             output_dtype: torch.dtype | None = None, output_scale: str = "none",
             scale_mode: str = "default", skip_softmax: bool = False,
             enable_pdl: bool | None = None, use_sinks: bool = False) -> None:
        """Fix the batch, widths, dtypes and scale for later :meth:`run` calls."""
        if metadata is None or any(v is not None for v in (qo_indptr, kv_indptr, kv_indices,
                                                            kv_len_arr)):
            raise NotImplementedError("double: only plan(metadata=MLAPlanMetadata.csr(...))")
        args = dict(num_heads=num_heads, head_dim_ckv=head_dim_ckv, head_dim_kpe=head_dim_kpe,
                    page_size=page_size, causal=causal, sm_scale=sm_scale,
                    q_data_type=q_data_type, kv_data_type=kv_data_type)
        missing = [k for k, v in args.items() if v is None]
        if missing:
            raise TypeError("plan() missing required arguments: " + ", ".join(missing))
        if causal or use_profiler or lse_mode != "none" or output_scale != "none" \
                or scale_mode != "default" or skip_softmax or enable_pdl or use_sinks \
                or output_dtype not in (None, q_data_type):
            raise NotImplementedError("double: heteroserve plans non-causal MLA without LSE, "
                                      "scales, sinks, skip-softmax, PDL or profiler")
        if (query_layout, kv_cache_layout) != ("split", "split"):
            raise NotImplementedError("double: heteroserve passes split query and KV cache")
        require(q_data_type in _HALF, f"MLA q_data_type {q_data_type} is not supported")
        require(kv_data_type == q_data_type, "non-FP8 KV dtype must match query dtype")
        require(head_dim_ckv % 128 == 0 and head_dim_kpe % 64 == 0 and head_dim_kpe > 0,
                "head_dim_ckv must be a multiple of 128 and head_dim_kpe of 64")
        require(head_dim_ckv in _FA3_CKV, "fa3 MLA requires head_dim_ckv in (128, 256, 512)")
        require(isinstance(page_size, int) and page_size > 0, "page_size must be positive")
        require(num_heads > 0, "num_heads must be positive")
        qo_t = _vector(metadata.qo_indptr, "qo_indptr", self.device)
        kv_t = _vector(metadata.kv_indptr, "kv_indptr", self.device)
        idx_t = _vector(metadata.kv_indices, "kv_indices", self.device)
        len_t = _vector(metadata.kv_len_arr, "kv_len_arr", self.device)
        qo, kv = _indptr(qo_t, "qo_indptr"), _indptr(kv_t, "kv_indptr")
        lens = [int(v) for v in len_t.cpu()]
        require(len(kv) == len(qo) and len(lens) == len(qo) - 1,
                "CSR metadata batch dimensions must agree")
        require(kv[-1] <= idx_t.numel(), "kv_indices holds fewer pages than kv_indptr says")
        require(all(n >= 0 for n in lens), "kv_len_arr metadata must be nonnegative")
        require(all(b - a == -(-n // page_size) for a, b, n in zip(kv, kv[1:], lens)),
                "kv_indptr page counts must equal ceil(kv_len_arr / page_size)")
        require(len(lens) > 0, "FA MLA native planning requires a nonempty batch")
        if self._graph is not None:
            self._fill_graph_buffers(qo_t, kv_t, idx_t, len_t)
            idx_t = self._graph[2]  # the kernel reads the reserved buffer
        pages = idx_t[kv[0]:kv[-1]].cpu()
        self._plan = dict(qo=qo, kv=kv, lens=lens, indices=idx_t, heads=num_heads,
                          widths=(head_dim_ckv, head_dim_kpe), page_size=page_size,
                          scale=float(sm_scale), dtype=q_data_type,
                          page_end=int(pages.max()) + 1 if pages.numel() else 0)

    def _fill_graph_buffers(self, *sources: torch.Tensor) -> None:
        assert self._graph is not None
        for name, buf, src in zip(("qo_indptr", "kv_indptr", "kv_indices", "kv_len_arr"),
                                  self._graph, sources):
            larger_ok = name == "kv_indices"
            require(buf.numel() >= src.numel() if larger_ok else buf.shape == src.shape,
                    f"CUDA graph reserved {name} buffer has insufficient or incompatible "
                    "capacity")
            if buf.data_ptr() != src.data_ptr():
                buf[: src.numel()].copy_(src)

    def _check_replay(self) -> None:
        """A replay runs the plan; refuse one whose buffers were refilled without a re-plan."""
        assert self._plan is not None and self._graph is not None
        qo_b, kv_b, _, len_b = self._graph
        stale = (qo_b.cpu().tolist() != self._plan["qo"] or kv_b.cpu().tolist() != self._plan["kv"]
                 or len_b.cpu().tolist() != self._plan["lens"])
        require(not stale, "the graph buffers hold another batch than the plan: plan() must "
                           "run before every replay")

    def run(self, q_nope: Any = None, q_pe: Any = None, ckv_cache: Any = None,
            kpe_cache: Any = None, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, *,
            query: Any = None, kv_cache: Any = None, **options: Any) -> torch.Tensor:
        """The planned attention of ``query`` over ``kv_cache`` (see the module docstring)."""
        if any(v is not None for v in (q_nope, q_pe, ckv_cache, kpe_cache)):
            raise NotImplementedError("double: only run(query=..., kv_cache=...)")
        if out is not None or lse is not None or return_lse or any(
                v not in (None, False) for v in options.values()):
            raise NotImplementedError("double: out / lse / scales / sinks are not used")
        if self._plan is None:
            raise RuntimeError("BatchMLAPagedAttentionWrapper.run() called before plan().")
        plan = self._plan
        if self._graph is not None:
            self._check_replay()
        require(isinstance(query, tuple) and len(query) == 2 and isinstance(kv_cache, tuple)
                and len(kv_cache) == 2, "double: split (q_nope, q_pe) and (ckv, kpe) tuples")
        (qn, qp), (ckv, kpe) = query, kv_cache
        c, r = plan["widths"]
        for t, name in ((qn, "q_nope"), (qp, "q_pe"), (ckv, "ckv_cache"), (kpe, "kpe_cache")):
            require(t.dim() == 3, f"split {name} must have rank 3")
            require(t.dtype == plan["dtype"], f"{name}.dtype={t.dtype} does not match the plan")
            require(t.device == self.device, f"{name} must be on the workspace device")
            require(_rows_aligned(t), f"{name}: the kernel needs a contiguous last dim and "
                                      "16-byte aligned rows")
        require(qn.shape[:2] == qp.shape[:2] == (plan["qo"][-1], plan["heads"]),
                "q_nope rows and heads must match the planned query shape")
        require((qn.shape[2], qp.shape[2], ckv.shape[2], kpe.shape[2]) == (c, r, c, r),
                "split last dimensions do not match the planned widths")
        require(ckv.shape[:2] == kpe.shape[:2] and ckv.shape[1] == plan["page_size"],
                "ckv_cache page size must match the planned page_size")
        require(ckv.shape[0] >= plan["page_end"], "KV cache does not cover the planned pages")
        result = torch.empty_like(qn)
        indices = plan["indices"].cpu().to(torch.long)
        q = torch.cat([qn, qp], dim=-1).cpu()
        keys = torch.cat([ckv, kpe], dim=-1).cpu()
        for b, n in enumerate(plan["lens"]):
            lo, hi = plan["qo"][b], plan["qo"][b + 1]
            pages = indices[plan["kv"][b]:plan["kv"][b + 1]]
            rows = keys[pages].reshape(-1, c + r)[:n]
            o = attend(q[lo:hi], rows[:, None], rows[:, None, :c], plan["scale"], causal=False)
            result[lo:hi] = o.to(result.dtype).to(result.device)
        return result


def build() -> types.ModuleType:
    """The ``flashinfer.mla`` double module."""
    mla = types.ModuleType("flashinfer.mla")
    mla.BatchMLAPagedAttentionWrapper = BatchMLAPagedAttentionWrapper
    mla.MLAPlanMetadata = MLAPlanMetadata
    mla.__heteroserve_double__ = True
    return mla
