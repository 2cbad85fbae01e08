"""Correctness checks of the Triton kernels on a GPU, at model sizes (used by kernels_h100.py).

Each check returns rows ``{"name", "err", "tol", "ok"}``; ``err`` is ``max|out-ref| /
max|ref|`` against float64 (computed on the GPU from the same rounded inputs, or by the
conformance oracles on the host); exact checks report ``err`` 0 or 1 with ``tol`` 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from heteroserve.conformance import quantize
from heteroserve.conformance.oracles import linear as linear_oracle
from heteroserve.conformance.oracles import sampling as sampling_oracle
from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer, ForwardMode
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.core.kernels.ops import SamplingBatch

DEV = torch.device("cuda")
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
Row = dict[str, Any]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double().to(out.device)
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    return float((o - r).abs().max() / r.abs().max().clamp(min=1e-30))


def row(name: str, err: float, tol: float) -> Row:
    return {"name": name, "err": err, "tol": tol, "ok": err <= tol}


def exact(name: str, ok: bool) -> Row:
    return {"name": name, "err": 0.0 if ok else 1.0, "tol": 0.0, "ok": bool(ok)}


# -- attention ---------------------------------------------------------------------------------
def _attn_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
              scale: float, window: int | None, cap: float | None) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    kp = torch.arange(k.shape[0], device=q.device)[None, :]
    allowed = kp <= q_pos[:, None]
    if window:
        allowed &= kp > q_pos[:, None] - window
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def attention_case(backend_cls: type, dtype: torch.dtype, mode: ForwardMode,
                   seqs: tuple[tuple[int, int], ...], hq: int, hk: int, d: int, page: int,
                   window: int | None = None, cap: float | None = None, ctx: int = 8192,
                   seed: int = 0) -> tuple[list[Row], Any, Any]:
    """Run one batch through ``backend_cls`` and compare every sequence with float64."""
    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(seqs, page, mode, DEV, gen)
    meta = batch.meta
    backend = backend_cls(AttentionConfig(hq, hk, d, page, dtype, DEV, max_context_len=ctx))
    shape = backend.kv_cache_shape(batch.num_pages)
    k_cache = torch.randn(shape, device=DEV).to(dtype)
    v_cache = torch.randn(shape, device=DEV).to(dtype)
    t = meta.num_tokens
    q = torch.randn(t, hq, d, device=DEV).to(dtype)
    k_new = torch.randn(t, hk, d, device=DEV).to(dtype)
    v_new = torch.randn(t, hk, d, device=DEV).to(dtype)
    before = k_cache.clone()
    layer = AttentionLayer(0, d ** -0.5, window, cap)
    backend.prepare(meta)
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, layer, meta)
    label = (f"{backend_cls.__name__}.{mode.value} {NAMES[dtype]} Hq{hq}/Hk{hk} D{d} "
             f"P{page}" + (f" W{window}" if window else "") + (f" cap{cap}" if cap else ""))
    flat_k, flat_before = k_cache.view(-1, hk, d), before.view(-1, hk, d)
    changed = (flat_k != flat_before).any(-1).any(-1)
    loc = meta.out_cache_loc.long()
    expect_changed = torch.zeros_like(changed)
    expect_changed[loc] = True
    kv_ok = torch.equal(flat_k[loc], k_new) and not bool((changed & ~expect_changed).any())
    rows = [exact(f"{label} kv_write", kv_ok)]
    errs, start = [], 0
    for b, (p, n) in enumerate(seqs):
        slots = batch.slots(b, 0, p + n).to(DEV)
        ref = _attn_ref(q[start:start + n], flat_k[slots], v_cache.view(-1, hk, d)[slots],
                        torch.arange(p, p + n, device=DEV), layer.scale, window, cap)
        errs.append(rel(out[start:start + n], ref))
        start += n
    rows.append(row(f"{label} B{len(seqs)} T{t}", max(errs), TOL[dtype]))
    return rows, backend, (q, k_new, v_new, k_cache, v_cache, layer, meta)


def check_attention() -> list[Row]:
    from heteroserve.platforms.triton.attention import TritonAttention as T

    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    ext, dec = ForwardMode.EXTEND, ForwardMode.DECODE
    gen = torch.Generator().manual_seed(5)
    long_dec = tuple((int(x), 1) for x in torch.randint(0, 4000, (16,), generator=gen))
    cases = [
        (bf, ext, ((0, 1024), (700, 300), (37, 1), (0, 5)), 32, 8, 128, 16, None, None),
        (fp, ext, ((0, 333), (90, 64)), 8, 8, 64, 1, None, None),
        (bf, ext, ((100, 257),), 16, 8, 256, 32, None, None),
        (bf, ext, ((500, 200),), 12, 4, 96, 16, 128, None),
        (bf, ext, ((64, 130),), 8, 1, 128, 16, None, 30.0),
        (f32, ext, ((300, 200),), 32, 8, 128, 16, None, None),
        (bf, dec, long_dec, 32, 8, 128, 16, None, None),
        (fp, dec, ((0, 1), (49, 1), (1999, 1)), 8, 8, 64, 8, 256, None),
        (bf, dec, ((3000, 1), (10, 1)), 16, 8, 256, 16, None, 50.0),
        (f32, dec, ((1000, 1), (1, 1), (77, 1), (513, 1)), 32, 8, 128, 16, None, None),
        (bf, dec, ((5000, 1),), 64, 8, 128, 64, None, None),
    ]
    rows: list[Row] = []
    for i, (dt, mode, seqs, hq, hk, d, page, window, cap) in enumerate(cases):
        rows += attention_case(T, dt, mode, seqs, hq, hk, d, page, window, cap, seed=i)[0]
    return rows


def check_graph_replay() -> list[Row]:
    """Decode attention captured by CudaGraphRunner: replay after new inputs == eager."""
    from heteroserve.platforms.cuda.graph import CudaGraphRunner
    from heteroserve.platforms.triton.attention import TritonAttention

    seqs = ((100, 1), (2000, 1), (7, 1), (513, 1))
    _, backend, (q, k, v, kc, vc, layer, meta) = attention_case(
        TritonAttention, torch.bfloat16, ForwardMode.DECODE, seqs, 32, 8, 128, 16, seed=11)
    out = torch.empty_like(q)
    graph = CudaGraphRunner(DEV).capture(
        lambda: out.copy_(backend.forward(q, k, v, kc, vc, layer, meta)), warmup=2)
    q.copy_(torch.randn_like(q))
    k.copy_(torch.randn_like(k))
    meta.seq_lens.copy_(meta.seq_lens - 3)  # shorter sequences, same pages: still valid
    meta.out_cache_loc.copy_(meta.out_cache_loc - 3)
    graph.replay()
    eager = backend.forward(q, k, v, kc, vc, layer, meta)
    torch.cuda.synchronize()
    return [exact("CudaGraphRunner decode replay == eager (new q/k, shorter seqs)",
                  torch.equal(out, eager))]


# -- elementwise ops ---------------------------------------------------------------------------
def check_elementwise() -> list[Row]:
    from heteroserve.platforms.triton import activation, norm, rotary

    rows: list[Row] = []
    for dt in (torch.bfloat16, torch.float16):
        x = (torch.randn(4096, 4096, device=DEV) * 2).to(dt)
        r = torch.randn(4096, 4096, device=DEV).to(dt)
        w = torch.randn(4096, device=DEV).to(dt)
        xd = x.double()
        ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        rows.append(row(f"rms_norm {NAMES[dt]} 4096x4096", rel(norm.rms_norm(x, w, 1e-6), ref),
                        TOL[dt]))
        s = (x.float() + r.float()).to(dt).double()
        ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        o, res = norm.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6)
        rows.append(row(f"fused_add_rms_norm {NAMES[dt]} 4096x4096", max(rel(o, ref),
                                                                       rel(res, s)), TOL[dt]))
        g = (torch.randn(2048, 2 * 14336, device=DEV) * 3).to(dt)
        gate, up = g.double().chunk(2, -1)
        rows.append(row(f"silu_and_mul {NAMES[dt]} 2048x14336",
                        rel(activation.silu_and_mul(g), F.silu(gate) * up), TOL[dt]))
        rows.append(row(f"gelu_and_mul(tanh) {NAMES[dt]} 2048x14336",
                        rel(activation.gelu_and_mul(g, "tanh"),
                            F.gelu(gate, approximate="tanh") * up), TOL[dt]))
        for neox in (True, False):
            q = torch.randn(4096, 32, 128, device=DEV).to(dt)
            k = torch.randn(4096, 8, 128, device=DEV).to(dt)
            cache = torch.randn(8192, 128, device=DEV)
            pos = torch.randint(0, 8192, (4096,), device=DEV)
            half = 64
            cos, sin = cache[pos, :half].double()[:, None], cache[pos, half:].double()[:, None]

            def ref_rot(t: torch.Tensor) -> torch.Tensor:
                t = t.double()
                if neox:
                    a, b = t[..., :half], t[..., half:]
                    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
                a, b = t[..., 0::2], t[..., 1::2]
                return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

            rq, rk = ref_rot(q), ref_rot(k)
            oq, ok = rotary.apply_rotary(pos, q, k, cache, neox)
            rows.append(row(f"rotary {'neox' if neox else 'gptj'} {NAMES[dt]} T4096 32/8x128",
                            max(rel(oq, rq), rel(ok, rk)), TOL[dt]))
    return rows


# -- MoE ---------------------------------------------------------------------------------------
def check_moe() -> list[Row]:
    from heteroserve.platforms.triton.moe import fused_moe, topk_softmax

    rows: list[Row] = []
    logits = torch.randn(777, 64, device=DEV)
    w, ids = topk_softmax(logits, 6, True)
    ref_w, ref_ids = torch.sort(torch.softmax(logits.double(), -1), dim=-1, descending=True,
                                stable=True)
    ref_w = ref_w[:, :6] / ref_w[:, :6].sum(-1, keepdim=True)
    rows.append(exact("moe_topk_softmax ids E64 k6 T777", torch.equal(ids.long(), ref_ids[:, :6])))
    rows.append(row("moe_topk_softmax weights E64 k6", rel(w, ref_w), 1e-5))
    for dt, t in ((torch.bfloat16, 100), (torch.float16, 3), (torch.bfloat16, 2048)):
        e, k, h, inter = 8, 2, 1024, 1408
        x = torch.randn(t, h, device=DEV).to(dt)
        w13 = (torch.randn(e, 2 * inter, h, device=DEV) / h ** 0.5).to(dt)
        w2 = (torch.randn(e, h, inter, device=DEV) / inter ** 0.5).to(dt)
        tw, tid = topk_softmax(torch.randn(t, e, device=DEV), k, True)
        out = fused_moe(x, w13, w2, tw, tid)
        ref = torch.zeros(t, h, dtype=torch.float64, device=DEV)
        for ex in range(e):
            rows_t, slot = (tid == ex).nonzero(as_tuple=True)
            if rows_t.numel():
                hmid = x[rows_t].double() @ w13[ex].double().T
                y = (F.silu(hmid[:, :inter]) * hmid[:, inter:]) @ w2[ex].double().T
                ref.index_add_(0, rows_t, y * tw[rows_t, slot].double()[:, None])
        rows.append(row(f"fused_moe {NAMES[dt]} T{t} E{e} k{k} H{h} I{inter}", rel(out, ref),
                        TOL[dt]))
    return rows


# -- linear ------------------------------------------------------------------------------------
def _linear(scheme: str, cls: type, dt: torch.dtype, t: int, k: int, n: int, group: int = 128,
            g_idx: bool = False, bias: bool = True) -> Row:
    gen = torch.Generator().manual_seed(t + k + n)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * k ** -0.5
    fp8 = torch.float8_e4m3fn
    if scheme == "fp8_per_tensor":
        ckpt = quantize.quantize_fp8_per_tensor(w, fp8)
    elif scheme == "fp8_block":
        ckpt = quantize.quantize_fp8_block(w, fp8)
    elif scheme == "int8_w8a8":
        ckpt = quantize.quantize_int8_per_channel(w)
    elif scheme == "awq_w4a16":
        ckpt = quantize.pack_awq(w, group)
    else:
        gi = None
        if g_idx:
            perm = torch.randperm(k, generator=gen)
            gi = torch.empty(k, dtype=torch.int64)
            gi[perm] = torch.arange(k) // group
        ckpt = quantize.pack_gptq(w, group, gi)
    method = cls()
    layer = torch.nn.Module()
    for name, spec in method.create_weights(LinearShape(k, n, dt, group, g_idx)).items():
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].to(DEV), requires_grad=False))
    method.process_weights_after_loading(layer)
    if scheme in ("fp8_per_tensor", "fp8_block", "int8_w8a8"):
        x = quantize.w8a8_activations(gen, t, k, scheme, dt, fp8)
    else:
        x = torch.randn(t, k, generator=gen, dtype=torch.float64).to(dt)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dt) if bias else None
    out = method.apply(layer, x.to(DEV), None if b is None else b.to(DEV))
    ref = linear_oracle.linear(scheme, x, ckpt, group, b, fp8)
    tag = f"-G{group}" + ("-gidx" if g_idx else "") if scheme.endswith("w4a16") else ""
    return row(f"linear.{scheme} {NAMES[dt]} T{t} K{k} N{n}{tag}", rel(out.cpu(), ref), TOL[dt])


def check_linear() -> list[Row]:
    from heteroserve.platforms.triton import linear_w4a16 as w4
    from heteroserve.platforms.triton import linear_w8a8 as w8

    rows = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        rows.append(_linear("fp8_per_tensor", w8.Fp8PerTensorLinear, dt, 33, 2048, 1024))
        rows.append(_linear("fp8_per_tensor", w8.Fp8PerTensorLinear, dt, 7, 320, 200))  # Triton
        rows.append(_linear("fp8_block", w8.Fp8BlockLinear, dt, 33, 2048, 1024))
        rows.append(_linear("fp8_block", w8.Fp8BlockLinear, dt, 1, 320, 192))
        rows.append(_linear("int8_w8a8", w8.Int8W8A8Linear, dt, 33, 2048, 1024))
        rows.append(_linear("int8_w8a8", w8.Int8W8A8Linear, dt, 300, 256, 256))
    for dt in (torch.bfloat16, torch.float16):
        rows.append(_linear("awq_w4a16", w4.AwqW4A16Linear, dt, 1, 2048, 1024))
        rows.append(_linear("awq_w4a16", w4.AwqW4A16Linear, dt, 200, 1024, 512, group=64))
        rows.append(_linear("gptq_w4a16", w4.GptqW4A16Linear, dt, 5, 2048, 1024))
        rows.append(_linear("gptq_w4a16", w4.GptqW4A16Linear, dt, 40, 1024, 512, g_idx=True))
    return rows


# -- sampling and bitmask ---------------------------------------------------------------------
def check_sampling() -> list[Row]:
    from heteroserve.platforms.triton.bitmask import apply_token_bitmask
    from heteroserve.platforms.triton.sampling import sample

    b, v = 64, 152064
    logits = torch.randn(b, v, device=DEV) * 3

    def params(temp: float, top_k: int, top_p: float, min_p: float, step: int = 0) -> SamplingBatch:
        return SamplingBatch(torch.full((b,), temp, device=DEV),
                             torch.full((b,), top_k, device=DEV, dtype=torch.int32),
                             torch.full((b,), top_p, device=DEV), torch.full((b,), min_p, device=DEV),
                             torch.arange(b, device=DEV) * 7919, torch.full((b,), step, device=DEV))

    rows = [exact("sampling greedy == argmax B64 V152064",
                  torch.equal(sample(logits, params(0.0, 0, 1.0, 0.0)), logits.argmax(-1))),
            exact("sampling top_k=1 == argmax", torch.equal(sample(logits, params(0.7, 1, 1.0, 0.0)),
                                                          logits.argmax(-1)))]
    for temp, tk, tp, mp in ((1.0, 50, 0.9, 0.0), (0.6, 0, 0.8, 0.05), (1.3, 20, 1.0, 0.1)):
        p = params(temp, tk, tp, mp, step=3)
        ids = sample(logits, p)
        same = torch.equal(ids, sample(logits, p))
        sub = sample(logits[[5, 2]], SamplingBatch(*(getattr(p, f)[[5, 2]] for f in (
            "temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps"))))
        inside = all(bool(sampling_oracle.support(logits[i].cpu(), temp, tk, tp, mp)[ids[i]])
                     for i in range(b))
        rows.append(exact(f"sampling T{temp} k{tk} p{tp} min_p{mp}: in support, deterministic, "
                          "batch-invariant", same and inside and torch.equal(sub, ids[[5, 2]])))
    words = (v + 31) // 32
    bits = torch.randint(0, 2, (b, words * 32), device=DEV, dtype=torch.int64)
    packed = (bits.view(b, words, 32) << torch.arange(32, device=DEV)).sum(-1)
    packed = (packed - ((packed >> 31) & 1) * (1 << 32)).to(torch.int32)
    masked = logits.clone()
    apply_token_bitmask(masked, packed)
    ref = torch.where(bits[:, :v].bool(), logits, torch.full_like(logits, float("-inf")))
    rows.append(exact("token_bitmask_apply B64 V152064", torch.equal(masked, ref)))
    return rows


CHECKS = [("attention", check_attention), ("linear", check_linear), ("moe", check_moe),
          ("graph_replay", check_graph_replay), ("sampling", check_sampling),
          ("elementwise", check_elementwise)]
