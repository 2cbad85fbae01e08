"""Multi-head latent attention through flashinfer's paged MLA kernel (contract:
``core/kernels/mla.py``).

``decode`` is the absorbed form: ``q_lat[h] = q_nope[h] @ w_kc[h]`` (one batched matmul),
then ``flashinfer.mla.BatchMLAPagedAttentionWrapper`` attends every head over the latent
cache as split views ``ckv = cache[..., :kv_lora_rank]``, ``kpe = cache[..., kv_lora_rank:]``
(scores ``sm_scale * (q_lat . ckv + q_pe . kpe)``, values ``ckv``; ``sm_scale`` is
``layer.scale``), and ``out[h] = o_lat[h] @ w_vc[h]^T`` gives ``[T, H, v_head_dim]``.

``extend`` and ``write_kv`` are :class:`TorchNativeMLA`'s, the ones the default ``TritonMLA``
also runs, so a side-by-side run differs in decode only. flashinfer's causal MLA is not used
for extends: in 0.7.4 its FA plan refuses some of them outright (more than 16384 work tiles,
``_fa_common._fa_plan_work_count``, reached by long chunks at 128 heads; and, when 64 or 128
is not a multiple of the head count, query tiles whose causal bound would drop a visible key,
``_fa_common._validate_fa_causal_tile_bound``), where the contract must serve every extend.

API used (flashinfer 0.7.4, ``flashinfer/mla/_batch_mla/_wrapper.py``): the constructor
``(float_workspace_buffer, use_cuda_graph, qo_indptr, kv_indptr, kv_indices, kv_len_arr,
backend="auto")`` (on sm90 ``auto`` plans ``fa3``, else ``fa2``: ``_auto_policy.py``);
``plan(metadata=MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len_arr), ...,
query_layout="split", kv_cache_layout="split")`` with int32 CSR arrays (host ones built from
the metadata's host lengths, the page indices the metadata's device tensor);
``run(query=(q_lat, q_pe), kv_cache=(ckv, kpe))``. The kernel takes the outer strides of
each tensor (``batch_mla_run.cu``) with a contiguous last dimension and 16-byte aligned rows,
so strided ``q_pe`` views pass as they are. A plan reads the planned page range back from
the device (``torch.aminmax(...).item()`` in ``_fa_common._plan_generated_fa``): one host
synchronisation per plan, one plan per step.

Decode graphs: for each captured batch size (:meth:`begin_graph_capture`) decode uses
wrappers built with ``use_cuda_graph=True`` on that static metadata's own ``qo_indptr``,
``kv_page_indptr``, ``kv_page_indices`` and ``seq_lens`` tensors, planned on first use (the
warm-up, outside the capture) and re-planned in :meth:`before_graph_replay` (the FA backends
allow re-planning a graph wrapper: ``supports_cuda_graph_replan``).

Supported: bf16/fp16 (q and cache alike), ``kv_lora_rank`` 128/256/512 with
``qk_rope_head_dim`` 64 (what both FA backends plan: ``fa2`` needs multiples of 128/64 within
the device's shared memory, ``fa3`` ``head_dim_ckv`` 128/256/512), any head count and page
size. Verified against the flashinfer double on the CPU
(``tests/vendor_platforms/test_flashinfer_mla.py``, conformance through ``cuda-double``) and
on an H100 (2026-12-07, flashinfer 0.7.4 JIT-built, ``fa3`` planned: cuda MLA conformance 40
passed, 0 failed; ``docs/conformance/conformance-cuda-h100-flashinfer-mla.md``); slower than
the Triton MLA there at DeepSeek-V2-Lite batch-1 decode (297.1 against 446.7 tok/s), so it
is registered below it.
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.kernels.mla import MLAConfig, MLALayer
from heteroserve.platforms.cpu.mla import TorchNativeMLA
from heteroserve.platforms.cuda.flashinfer_attention import host_index_arrays

WORKSPACE_BYTES = 128 * 1024 * 1024
DTYPES = (torch.bfloat16, torch.float16)
KV_LORA_RANKS = (128, 256, 512)
ROPE_DIMS = (64,)


def unsupported(dtype: torch.dtype, kv_lora_rank: int | None,
                qk_rope_head_dim: int | None) -> str | None:
    """Why flashinfer's MLA cannot serve this configuration, or None (``None`` widths: not
    known yet, not a refusal)."""
    if dtype not in DTYPES:
        return f"flashinfer MLA takes bf16/fp16, not {dtype}"
    if kv_lora_rank is not None and kv_lora_rank not in KV_LORA_RANKS:
        return f"kv_lora_rank {kv_lora_rank} not in {list(KV_LORA_RANKS)}"
    if qk_rope_head_dim is not None and qk_rope_head_dim not in ROPE_DIMS:
        return f"qk_rope_head_dim {qk_rope_head_dim} not in {list(ROPE_DIMS)}"
    return None


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernel can read it through its outer strides (last dimension
    contiguous, pointer and outer strides 16-byte aligned), else a contiguous copy."""
    size = t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(t.shape[d] <= 1 or (t.stride(d) * size) % 16 == 0 for d in range(t.dim() - 1)))
    return t if ok else t.contiguous()


class FlashInferMLA(TorchNativeMLA):
    """flashinfer paged MLA decode (absorbed, graph-safe), torch-native extend and
    ``write_kv``. Raises ``ValueError`` for a configuration outside :func:`unsupported` and
    ``ImportError`` when flashinfer cannot be imported."""

    graph_safe = True  # through the graph wrappers (module docstring)

    def __init__(self, config: MLAConfig) -> None:
        super().__init__(config)
        why = unsupported(config.dtype, config.kv_lora_rank, config.qk_rope_head_dim)
        if why:
            raise ValueError(f"FlashInferMLA: {why}")
        from flashinfer.mla import (  # noqa: PLC0415  (vendor import only when built)
            BatchMLAPagedAttentionWrapper, MLAPlanMetadata,
        )

        self._wrapper_cls: Any = BatchMLAPagedAttentionWrapper
        self._csr: Any = MLAPlanMetadata.csr
        self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=config.device)
        self._wrappers: dict[float, Any] = {}
        self._planned: set[float] = set()
        self._meta: AttentionMetadata | None = None
        self._host: dict[str, torch.Tensor] = {}
        #: id(static meta) -> (that meta, its graph wrappers by scale)
        self._graphs: dict[int, tuple[AttentionMetadata, dict[float, Any]]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        """Forget last step's plans; build this step's host CSR arrays (decode only)."""
        self._meta = meta
        self._planned.clear()
        self._host = host_index_arrays(meta) if meta.mode is ForwardMode.DECODE else {}

    def begin_graph_capture(self, meta: AttentionMetadata) -> None:
        """Decode over ``meta`` from now on uses graph wrappers bound to its tensors."""
        if meta.mode is ForwardMode.DECODE:
            self._graphs[id(meta)] = (meta, {})

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """Re-plan every graph wrapper of ``meta`` from its current host lengths."""
        entry = self._graphs.get(id(meta))
        if entry is None or entry[0] is not meta:
            return
        host = host_index_arrays(meta)
        for scale, wrapper in entry[1].items():
            self._plan(wrapper, scale, meta, host)

    def _plan(self, wrapper: Any, scale: float, meta: AttentionMetadata,
              host: dict[str, torch.Tensor]) -> None:
        c = self.config
        wrapper.plan(
            metadata=self._csr(host["qo_indptr"], host["kv_indptr"], meta.kv_page_indices,
                               host["seq_lens"]),
            num_heads=c.num_heads, head_dim_ckv=c.kv_lora_rank,
            head_dim_kpe=c.qk_rope_head_dim, page_size=meta.page_size, causal=False,
            sm_scale=float(scale), q_data_type=c.dtype, kv_data_type=c.dtype,
            query_layout="split", kv_cache_layout="split")

    def _wrapper(self, layer: MLALayer, meta: AttentionMetadata) -> Any:
        scale = float(layer.scale)
        entry = self._graphs.get(id(meta))
        if entry is not None and entry[0] is meta:
            wrapper = entry[1].get(scale)
            if wrapper is None:  # first use is the warm-up, outside the capture
                wrapper = self._wrapper_cls(
                    self._workspace, use_cuda_graph=True, qo_indptr=meta.qo_indptr,
                    kv_indptr=meta.kv_page_indptr, kv_indices=meta.kv_page_indices,
                    kv_len_arr=meta.seq_lens)
                self._plan(wrapper, scale, meta, host_index_arrays(meta))
                entry[1][scale] = wrapper
            return wrapper
        if meta is not self._meta:
            self.prepare(meta)
        wrapper = self._wrappers.get(scale)
        if wrapper is None:
            wrapper = self._wrappers[scale] = self._wrapper_cls(self._workspace)
        if scale not in self._planned:
            self._plan(wrapper, scale, meta, self._host)
            self._planned.add(scale)
        return wrapper

    def decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        """One query per sequence over its whole latent cache, ``[B, H, v_head_dim]`` in the
        query dtype. ``q_nope``/``q_pe`` may be strided views (last dimension contiguous)."""
        bsz = self._check_decode(q_nope, q_pe, cache, w_kc, w_vc, meta)
        c = self.config
        if bsz == 0:
            return q_nope.new_empty((0, c.num_heads, c.v_head_dim))
        # absorbed query [H, B, dn] @ [H, dn, c] -> [H, B, c], read as [B, H, c] (strided)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_kc).transpose(0, 1)
        ckv, kpe = cache[..., :c.kv_lora_rank], cache[..., c.kv_lora_rank:]
        o_lat = self._wrapper(layer, meta).run(query=(_kernel_view(q_lat), _kernel_view(q_pe)),
                                               kv_cache=(ckv, kpe))
        # absorbed output: [H, B, c] @ [H, c, dv] -> [H, B, dv], read as [B, H, dv]
        return torch.bmm(o_lat.transpose(0, 1), w_vc.transpose(1, 2)).transpose(0, 1)
