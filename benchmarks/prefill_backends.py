"""Long-prompt attention on the GPU: the Triton extend kernel against torch's fused SDPA
kernels (FlashAttention-2 and cuDNN), at the shapes of the prefill headline rows.

Cases (Llama-3.1-8B heads: 32 query / 8 KV, head 128, bf16, page 16): a whole 8k and 32k
prompt (causal from position 0), and 8192-token chunks on a cached prefix of 8k, 24k and 94k
tokens (the later chunks of a 32k and a 100k prompt). Variants:

- ``triton``: ``extend_attention`` over the paged cache;
- ``engine``: the ``extend`` of the cuda default attention backend
  (``TritonAttentionSDPAExtend``: cuDNN in bucketed shapes), on q as the engine passes it (a
  view of a fused qkv output), with the fused kernels torch says it may use (``usable``);
  ``engine_flash_triton``: the same backend with its cuDNN knobs off (whole prompts in flash,
  chunks on a prefix in Triton: the default before 2026-12-05);
- ``flash`` / ``cudnn``: ``F.scaled_dot_product_attention`` restricted to one torch backend,
  causal (whole prompts) or with a bottom-right causal mask (chunks), over K/V gathered
  out of the paged cache (the gather is timed as part of the call, as the engine pays it);
- ``flash_split`` / ``cudnn_split`` (chunks): the prefix attended without a mask and the
  chunk causally, two fused calls that return their log-sum-exp, merged in fp32 (``_rep``:
  with K/V repeated to the query heads first, for a kernel without native GQA).
- ``flashinfer_fa3`` / ``flashinfer_fa2`` (where flashinfer imports: on the GPU machine from
  ``.whl/fi_site.tar.xz``): ``BatchPrefillWithRaggedKVCacheWrapper`` with that ``backend``
  over the gathered K/V (NHD), causal (flashinfer aligns the mask to the end of the keys, so
  a chunk on a prefix needs no split); its plan JIT-builds the module.
  ``flashinfer_fa3_nogather`` (whole prompts): the same on K/V as the projection would hand
  them (no gather from the pages), what a backend could pass for a prompt with no prefix.

``first_ms`` is the first call's wall time (each case is a new shape: torch builds and caches
a cuDNN plan per shape). TFLOP/s count ``4 * Hq * D`` per visible query-key pair, next to a large bf16 matmul's rate
measured in the same run. Every variant is checked against ``triton``'s output first; one
that torch refuses or that fails is recorded with its error. Usage: ``python
benchmarks/prefill_backends.py --out prefill_backends.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_sweep import matmul_tflops  # noqa: E402

from heteroserve.conformance.paged import build_batch  # noqa: E402
from heteroserve.core.kernels.attention import (  # noqa: E402
    AttentionConfig, AttentionLayer, ForwardMode,
)
from heteroserve.platforms.cuda.sdpa_extend import (  # noqa: E402
    TritonAttentionSDPAExtend, cudnn_usable, flash_usable,
)
from heteroserve.platforms.triton.attention_extend import extend_attention  # noqa: E402

HQ, HK, D, PAGE = 32, 8, 128, 16
CASES = [("whole_8k", 0, 8192), ("whole_32k", 0, 32768), ("chunk_on_8k", 8192, 8192),
         ("chunk_on_24k", 24576, 8192), ("chunk_on_94k", 94208, 8192)]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sdpa(backend: str) -> Callable[..., torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool | str,
            scale: float) -> torch.Tensor:
        with sdpa_kernel([kind]):
            if causal == "lower_right":
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(q.shape[-2], k.shape[-2])
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                      enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale,
                                                  enable_gqa=True)
    return run


def _with_lse(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float, expand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [1, Hq, n, D], lse [1, Hq, n] natural log)`` from torch's fused kernel; K/V
    repeated to ``Hq`` heads first when ``expand`` (else passed with ``Hk`` heads)."""
    if expand and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if backend == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(q.shape[:3]).float()


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
           ) -> torch.Tensor:
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(o1.dtype)


def flashinfer_variants(q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
                        slots: torch.Tensor, prefix: int, scale: float
                        ) -> dict[str, Callable[[], torch.Tensor]]:
    """The ``flashinfer_*`` variants (module docstring) for ``q [n, Hq, D]`` over the
    sequence's slots of the flat caches ``[slots, Hk, D]``: ``BatchPrefillWithRaggedKVCache
    Wrapper`` (one sequence, NHD, causal) planned once per backend, outside the timing; none
    where flashinfer does not import."""
    try:
        from flashinfer.prefill import BatchPrefillWithRaggedKVCacheWrapper
    except ImportError as exc:
        _log(f"flashinfer variants skipped: {exc}")
        return {}
    n, hq, d = q.shape
    length, hk = slots.numel(), flat_k.shape[1]
    qo_indptr = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    kv_indptr = torch.tensor([0, length], dtype=torch.int32, device=q.device)
    k_direct = flat_k.index_select(0, slots)  # stands for the projection's rows
    v_direct = flat_v.index_select(0, slots)
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for backend in ("fa3", "fa2"):
        wrapper = BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(256 << 20, dtype=torch.uint8, device=q.device), "NHD",
            backend=backend)
        try:
            wrapper.plan(qo_indptr, kv_indptr, hq, hk, d, causal=True, sm_scale=scale,
                         q_data_type=q.dtype, kv_data_type=q.dtype)
        except Exception as exc:  # the JIT build or the plan refused: recorded, not fatal
            _log(f"flashinfer {backend}: {type(exc).__name__}: {str(exc)[:200]}")
            continue

        def gathered(wrapper=wrapper) -> torch.Tensor:
            return wrapper.run(q, flat_k.index_select(0, slots), flat_v.index_select(0, slots))
        out[f"flashinfer_{backend}"] = gathered
        if backend == "fa3" and prefix == 0:
            def direct(wrapper=wrapper) -> torch.Tensor:
                return wrapper.run(q, k_direct, v_direct)
            out["flashinfer_fa3_nogather"] = direct
    return out


def run_case(name: str, prefix: int, new: int, peak: float, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    layer = AttentionLayer(0, D ** -0.5)
    batch = build_batch(((prefix, new),), PAGE, ForwardMode.EXTEND, device, gen)
    shape = (batch.num_pages, PAGE, HK, D)
    k_cache = torch.randn(shape, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=device, dtype=torch.bfloat16)
    q = torch.randn(new, HQ, D, device=device, dtype=torch.bfloat16)
    # as the engine passes it: a view of a fused qkv projection's output
    qkv = torch.randn(new, (HQ + 2 * HK) * D, device=device, dtype=torch.bfloat16)
    qkv[:, :HQ * D] = q.reshape(new, -1)
    q_view = qkv[:, :HQ * D].view(new, HQ, D)
    seq_len = prefix + new
    pages = -(-seq_len // PAGE)
    table = batch.meta.kv_page_indices[:pages].to(torch.long)
    slots = (table[:, None] * PAGE + torch.arange(PAGE, device=device)).reshape(-1)[:seq_len]
    flat_k, flat_v = k_cache.view(-1, HK, D), v_cache.view(-1, HK, D)
    flops = 4 * HQ * D * sum(prefix + i + 1 for i in range(new))

    def gathered() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = flat_k.index_select(0, slots).transpose(0, 1)[None]
        v = flat_v.index_select(0, slots).transpose(0, 1)[None]
        return q.transpose(0, 1)[None], k, v

    def triton_call() -> torch.Tensor:
        out = torch.empty_like(q)
        extend_attention(q, k_cache, v_cache, out, layer, batch.meta, new, HK)
        return out

    config = AttentionConfig(num_q_heads=HQ, num_kv_heads=HK, head_size=D, page_size=PAGE,
                             dtype=torch.bfloat16, device=device)
    before = TritonAttentionSDPAExtend(config)
    before.cudnn_prompts = before.cudnn_chunks = False
    engines = {"engine": TritonAttentionSDPAExtend(config), "engine_flash_triton": before}
    qs, ks, vs = gathered()
    usable = {"cudnn_causal_whole": cudnn_usable(qs, ks, vs, True),
              "flash_whole": flash_usable(qs, ks, vs)}
    if prefix:
        usable["cudnn_prefix"] = cudnn_usable(qs, ks[:, :, :prefix], vs[:, :, :prefix], False)
        usable["cudnn_chunk_causal"] = cudnn_usable(qs, ks[:, :, prefix:], vs[:, :, prefix:],
                                                    True)
    _log(f"{name}: {usable}")
    if not all(usable.values()):  # torch's reasons, as warnings of its debug mode
        import warnings
        from torch.backends.cuda import SDPAParams, can_use_cudnn_attention
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            can_use_cudnn_attention(SDPAParams(qs, ks, vs, None, 0.0, True, True), True)
        usable["cudnn_refusal"] = [str(w.message)[:300] for w in caught]
        _log(f"{name}: cudnn refusal {usable['cudnn_refusal']}")

    usable["cudnn_strided_q"] = cudnn_usable(q_view.transpose(0, 1)[None], ks, vs, True)

    variants: dict[str, Callable[[], torch.Tensor]] = {"triton": triton_call}
    for label, engine in engines.items():
        def engine_call(engine=engine) -> torch.Tensor:
            return engine.extend(q_view, k_cache, v_cache, layer, batch.meta)
        variants[label] = engine_call
    for backend in ("flash", "cudnn"):
        sdpa = _sdpa(backend)

        def dense(sdpa=sdpa) -> torch.Tensor:
            qs, k, v = gathered()
            o = sdpa(qs, k, v, True if prefix == 0 else "lower_right", layer.scale)
            return o[0].transpose(0, 1)
        variants[backend] = dense
        for expand in (False, True) if prefix else ():
            def split(backend=backend, expand=expand) -> torch.Tensor:
                qs, k, v = gathered()
                o1, l1 = _with_lse(backend, qs, k[:, :, :prefix], v[:, :, :prefix], False,
                                   layer.scale, expand)
                o2, l2 = _with_lse(backend, qs, k[:, :, prefix:], v[:, :, prefix:], True,
                                   layer.scale, expand)
                return _merge(o1, l1, o2, l2)[0].transpose(0, 1)
            variants[f"{backend}_split{'_rep' if expand else ''}"] = split

    variants.update(flashinfer_variants(q, flat_k, flat_v, slots, prefix, layer.scale))
    rows, ref = [], None
    for variant, call in variants.items():
        row = {"case": name, "prefix": prefix, "new": new, "variant": variant,
               "usable": usable}
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            row["first_ms"] = round((time.perf_counter() - t0) * 1e3, 2)  # a new shape: plans
            if ref is None:
                ref = out.float()
            row["max_abs_diff"] = float((out.float() - ref).abs().max())
            ms = triton.testing.do_bench(call, warmup=3, rep=40)
        except Exception as exc:  # a backend torch refuses for these shapes
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            _log(f"{name:14s} {variant:12s} {row['error']}")
            rows.append(row)
            continue
        tf = flops / (ms * 1e-3) / 1e12
        row.update(ms=round(ms, 3), tflops=round(tf, 1), fraction_of_matmul=round(tf / peak, 3))
        _log(f"{name:14s} {variant:12s} {ms:8.3f} ms {tf:6.1f} TF/s ({tf / peak:.0%}) "
             f"diff {row['max_abs_diff']:.2g} first call {row['first_ms']:.1f} ms")
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="prefill_backends.json")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("prefill_backends: needs a GPU")
        return 0
    device = torch.device("cuda")
    peak = matmul_tflops(device)
    _log(f"bf16 matmul {peak:.0f} TF/s; torch {torch.__version__}, "
         f"cudnn {torch.backends.cudnn.version()}")
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
              time.gmtime()), "command": " ".join(sys.argv), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "matmul_tflops": round(peak, 1),
              "rows": []}
    for name, prefix, new in CASES:
        if args.cases and name not in args.cases.split(","):
            continue
        result["rows"] += run_case(name, prefix, new, peak, device)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
