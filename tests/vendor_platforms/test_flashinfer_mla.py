"""The flashinfer MLA adapter (``platforms/cuda/flashinfer_mla.py``) on the flashinfer double:
decode and extend against the float64 MLA oracle over batch sizes, page sizes, prefixes and
strided inputs, exact latent writes, one plan per step, the decode-graph re-plan, the
constructor's refusals, and how the registry places it (below Triton, chosen when forced or
when Triton cannot serve)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from heteroserve.conformance.checks import rel_err
from heteroserve.conformance.oracles.mla import mla as mla_oracle
from heteroserve.conformance.paged import PagedBatch, build_batch, new_cache
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.kernels.dispatch import parse_kernel_overrides, resolve_all, resolve_op
from heteroserve.core.kernels.mla import MLAConfig, MLALayer
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
DEEPSEEK = (512, 128, 64, 128)  # kv_lora_rank, qk_nope, qk_rope, v
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@dataclass
class Setup:
    backend: object
    batch: PagedBatch
    cache: torch.Tensor
    rows: list[torch.Tensor]
    q_nope: torch.Tensor
    q_pe: torch.Tensor
    new: torch.Tensor
    w_kc: torch.Tensor
    w_vc: torch.Tensor
    layer: MLALayer
    seqs: tuple[tuple[int, int], ...]

    def reference(self) -> torch.Tensor:
        c = self.backend.config.kv_lora_rank  # type: ignore[attr-defined]
        return mla_oracle(self.q_nope, self.q_pe, [x[:, :c] for x in self.rows],
                          [x[:, c:] for x in self.rows], self.w_kc, self.w_vc,
                          [n for _, n in self.seqs], self.layer.scale)


def _setup(seqs: tuple[tuple[int, int], ...], page: int, dtype: torch.dtype, heads: int = 16,
           mode: ForwardMode = ForwardMode.DECODE, seed: int = 0, backend: object = None
           ) -> Setup:
    """Sequences ``(prefix, new)`` on scattered pages; prefixes in the cache, the rest SENTINEL."""
    from heteroserve.platforms.cuda.flashinfer_mla import FlashInferMLA

    c, dn, r, dv = DEEPSEEK
    gen = torch.Generator().manual_seed(seed)
    if backend is None:
        backend = FlashInferMLA(MLAConfig(heads, c, dn, r, dv, page, dtype, CPU))
    batch = build_batch(seqs, page, mode, CPU, gen)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    rows = [rand(p + n, c + r) for p, n in seqs]
    cache = new_cache(backend.kv_cache_shape(batch.num_pages), dtype, CPU)
    for b, (p, _) in enumerate(seqs):
        cache.view(-1, c + r)[batch.slots(b, 0, p)] = rows[b][:p]
    new = torch.cat([x[p:] for x, (p, _) in zip(rows, seqs)])
    t = new.shape[0]
    return Setup(backend, batch, cache, rows, rand(t, heads, dn), rand(t, heads, r), new,
                 rand(heads, dn, c, std=c ** -0.5), rand(heads, dv, c, std=c ** -0.5),
                 MLALayer(0, (dn + r) ** -0.5), seqs)


def _forward(s: Setup, q_nope: torch.Tensor | None = None,
             q_pe: torch.Tensor | None = None) -> torch.Tensor:
    c = DEEPSEEK[0]
    s.backend.prepare(s.batch.meta)  # type: ignore[attr-defined]
    return s.backend.forward(  # type: ignore[attr-defined]
        s.q_nope if q_nope is None else q_nope, s.q_pe if q_pe is None else q_pe,
        s.new[:, :c], s.new[:, c:], s.cache, s.w_kc, s.w_vc, s.layer, s.batch.meta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [1, 16, 64])
@pytest.mark.parametrize("lens", [(7,), (1, 33, 16, 130), (2, 5, 9, 17, 64, 3, 40, 1, 90)])
def test_decode_matches_the_oracle(flashinfer_double, dtype: torch.dtype, page: int,
                                   lens: tuple[int, ...]) -> None:
    s = _setup(tuple((n - 1, 1) for n in lens), page, dtype, seed=len(lens) * page)
    out = _forward(s)
    assert out.shape == (len(lens), 16, DEEPSEEK[3]) and out.dtype == dtype
    assert rel_err(out, s.reference()) < TOL[dtype]


@pytest.mark.parametrize("heads", [1, 128])
def test_decode_any_head_count(flashinfer_double, heads: int) -> None:
    s = _setup(((12, 1), (40, 1)), 16, torch.bfloat16, heads=heads, seed=heads)
    assert rel_err(_forward(s), s.reference()) < TOL[torch.bfloat16]


@pytest.mark.parametrize("page", [1, 16])
def test_extend_with_prefixes_matches_the_oracle(flashinfer_double, page: int) -> None:
    seqs = ((0, 9), (20, 5), (3, 1), (47, 30))  # causal over prefix + new, aligned to the end
    s = _setup(seqs, page, torch.bfloat16, mode=ForwardMode.EXTEND, seed=page)
    out = _forward(s)
    assert out.shape == (45, 16, DEEPSEEK[3])
    assert rel_err(out, s.reference()) < TOL[torch.bfloat16]


def test_write_kv_stores_exactly_the_new_rows(flashinfer_double) -> None:
    s = _setup(((5, 1), (0, 1), (31, 1)), 16, torch.bfloat16)
    before = s.cache.clone()
    c = DEEPSEEK[0]
    s.backend.write_kv(s.new[:, :c], s.new[:, c:], s.cache, s.batch.meta)  # type: ignore
    loc = s.batch.meta.out_cache_loc
    flat, old = s.cache.view(-1, s.cache.shape[-1]), before.view(-1, s.cache.shape[-1])
    assert torch.equal(flat[loc], s.new)
    keep = torch.ones(flat.shape[0], dtype=torch.bool)
    keep[loc] = False
    assert torch.equal(flat[keep], old[keep])


def test_strided_and_misaligned_query_views(flashinfer_double) -> None:
    """q_nope / q_pe as views of one projection (as the DeepSeek layer passes them) attend
    like dense copies; a q_pe view whose rows are not 16-byte aligned is copied first (the
    kernel, and the double, read only 16-byte aligned rows)."""
    s = _setup(((9, 1), (30, 1), (2, 1)), 16, torch.bfloat16)
    dense = _forward(s)
    dn, r = DEEPSEEK[1], DEEPSEEK[2]
    q = torch.cat([s.q_nope, s.q_pe], dim=-1)
    q_nope, q_pe = q.split([dn, r], dim=-1)
    assert not q_pe.is_contiguous()
    assert torch.equal(_forward(s, q_nope, q_pe), dense)
    odd = torch.cat([s.q_pe[..., :3], s.q_pe], dim=-1)[..., 3:]  # 6-byte offset rows
    assert odd.data_ptr() % 16 != 0
    assert torch.equal(_forward(s, q_pe=odd), dense)


def test_one_plan_per_step(flashinfer_double, monkeypatch: pytest.MonkeyPatch) -> None:
    from flashinfer.mla import BatchMLAPagedAttentionWrapper

    plans: list[int] = []
    real = BatchMLAPagedAttentionWrapper.plan
    monkeypatch.setattr(BatchMLAPagedAttentionWrapper, "plan",
                        lambda self, *a, **k: plans.append(1) or real(self, *a, **k))
    s = _setup(((4, 1), (17, 1)), 16, torch.bfloat16)
    first = _forward(s)
    s.backend.decode(s.q_nope, s.q_pe, s.cache, s.w_kc, s.w_vc, s.layer,  # type: ignore
                     s.batch.meta)  # a second layer, same step: the plan is reused
    assert len(plans) == 1
    other = _setup(((25, 1), (2, 1), (8, 1)), 16, torch.bfloat16, seed=5, backend=s.backend)
    c = DEEPSEEK[0]
    out = other.backend.forward(  # type: ignore[attr-defined]
        other.q_nope, other.q_pe, other.new[:, :c], other.new[:, c:], other.cache, other.w_kc,
        other.w_vc, other.layer, other.batch.meta)  # a new step without prepare(): re-planned
    assert len(plans) == 2 and out.shape[0] == 3
    assert rel_err(out, other.reference()) < 2e-2 and first.shape[0] == 2


def _static(bs: int, page: int, max_pages: int) -> AttentionMetadata:
    """Graph buffers as DecodeGraphs allocates them: one token in page 0 per row."""
    i32 = lambda n: torch.zeros(n, dtype=torch.int32)  # noqa: E731
    return AttentionMetadata(
        mode=ForwardMode.DECODE, page_size=page,
        qo_indptr=torch.arange(bs + 1, dtype=torch.int32), seq_lens=i32(bs) + 1,
        prefix_lens=i32(bs), kv_page_indptr=torch.arange(bs + 1, dtype=torch.int32),
        kv_page_indices=i32(max_pages), kv_last_page_len=i32(bs) + 1,
        out_cache_loc=torch.zeros(bs, dtype=torch.int64), seq_lens_cpu=[1] * bs,
        prefix_lens_cpu=[0] * bs)


def _fill(static: AttentionMetadata, meta: AttentionMetadata) -> None:
    """What DecodeGraphs.run copies in before a replay."""
    n = meta.kv_page_indices.numel()
    for name in ("qo_indptr", "seq_lens", "prefix_lens", "kv_page_indptr", "kv_last_page_len",
                 "out_cache_loc"):
        getattr(static, name).copy_(getattr(meta, name))
    static.kv_page_indices[:n].copy_(meta.kv_page_indices)
    static.seq_lens_cpu[:] = meta.seq_lens_cpu
    static.prefix_lens_cpu[:] = meta.prefix_lens_cpu


def test_graph_decode_replans_before_each_replay(flashinfer_double) -> None:
    from heteroserve.platforms.cuda.flashinfer_mla import FlashInferMLA

    c, dn, r, dv = DEEPSEEK
    backend = FlashInferMLA(MLAConfig(16, c, dn, r, dv, 16, torch.bfloat16, CPU))
    assert backend.graph_safe
    static = _static(2, 16, 64)
    backend.begin_graph_capture(static)
    warm = _setup(((0, 1), (0, 1)), 16, torch.bfloat16, backend=backend)
    backend.decode(warm.q_nope, warm.q_pe, torch.zeros(8, 16, c + r, dtype=torch.bfloat16),
                   warm.w_kc, warm.w_vc, warm.layer, static)  # the warm-up plans the wrapper
    assert not backend._wrappers and len(backend._graphs[id(static)][1]) == 1
    for seed, seqs in ((1, ((8, 1), (40, 1))), (2, ((2, 1), (13, 1)))):
        s = _setup(seqs, 16, torch.bfloat16, seed=seed, backend=backend)
        backend.write_kv(s.new[:, :c], s.new[:, c:], s.cache, s.batch.meta)
        _fill(static, s.batch.meta)
        backend.before_graph_replay(static)
        out = backend.decode(s.q_nope, s.q_pe, s.cache, s.w_kc, s.w_vc, s.layer, static)
        assert rel_err(out, s.reference()) < 2e-2
    _fill(static, _setup(((6, 1), (6, 1)), 16, torch.bfloat16, seed=3).batch.meta)
    with pytest.raises(ValueError, match=r"plan\(\) must run before every replay"):
        backend.decode(s.q_nope, s.q_pe, s.cache, s.w_kc, s.w_vc, s.layer, static)


def test_constructor_refuses_what_the_kernel_cannot_plan(flashinfer_double) -> None:
    from heteroserve.platforms.cuda.flashinfer_mla import FlashInferMLA

    def make(dtype: torch.dtype = torch.bfloat16, c: int = 512, r: int = 64) -> FlashInferMLA:
        return FlashInferMLA(MLAConfig(16, c, 128, r, 128, 16, dtype, CPU))

    with pytest.raises(ValueError, match="bf16/fp16"):
        make(torch.float32)
    with pytest.raises(ValueError, match="kv_lora_rank 64"):
        make(c=64)
    with pytest.raises(ValueError, match="kv_lora_rank 384"):
        make(c=384)  # fa2 could plan it, sm90's fa3 cannot
    with pytest.raises(ValueError, match="qk_rope_head_dim 32"):
        make(r=32)
    for c in (128, 256, 512):  # everything accepted is planned by the double's fa3 rules
        backend = make(c=c)
        assert backend.config.kv_lora_rank == c


def test_constructor_needs_flashinfer() -> None:
    if importlib.util.find_spec("flashinfer") is not None:
        pytest.skip("a flashinfer is importable here")
    from heteroserve.platforms.cuda.flashinfer_mla import FlashInferMLA

    with pytest.raises(ImportError):
        FlashInferMLA(MLAConfig(16, 512, 128, 64, 128, 16, torch.bfloat16, CPU))


def test_double_rejects_what_flashinfer_rejects(flashinfer_double) -> None:
    """The MLA double is strict where flashinfer 0.7.4's plan/run are (ValueError), so an
    adapter bug shows up on the CPU."""
    from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata

    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    good = dict(qo=i32([0, 1, 2]), kv=i32([0, 1, 3]), idx=i32([4, 5, 6]), len=i32([3, 20]))
    opts = dict(num_heads=16, head_dim_ckv=512, head_dim_kpe=64, page_size=16, causal=False,
                sm_scale=0.1, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                query_layout="split", kv_cache_layout="split")

    def plan(**change: object) -> BatchMLAPagedAttentionWrapper:
        w = BatchMLAPagedAttentionWrapper(torch.empty(1024, dtype=torch.uint8))
        meta = {**good, **{k: v for k, v in change.items() if k in good}}
        w.plan(metadata=MLAPlanMetadata.csr(meta["qo"], meta["kv"], meta["idx"], meta["len"]),
               **{**opts, **{k: v for k, v in change.items() if k not in good}})
        return w

    bad = {"page counts": dict(len=i32([3, 40])), "int32": dict(idx=good["idx"].long()),
           "batch dimensions": dict(len=i32([3])), "fewer pages": dict(idx=i32([4, 5])),
           "q_data_type": dict(q_data_type=torch.float32, kv_data_type=torch.float32),
           "must match query": dict(kv_data_type=torch.float16),
           "head_dim_ckv in": dict(head_dim_ckv=384)}
    for reason, change in bad.items():
        with pytest.raises(ValueError, match=reason):
            plan(**change)
    with pytest.raises(NotImplementedError):
        plan(causal=True)
    w = plan()
    q = torch.zeros(2, 16, 512 + 64, dtype=torch.bfloat16)
    cache = torch.zeros(8, 16, 576, dtype=torch.bfloat16)
    split = (cache[..., :512], cache[..., 512:])
    assert w.run(query=(q[..., :512], q[..., 512:]), kv_cache=split).shape == (2, 16, 512)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        w.run(query=(q[..., :512], torch.zeros(2, 16, 67, dtype=torch.bfloat16)[..., 3:]),
              kv_cache=split)
    with pytest.raises(ValueError, match="cover the planned pages"):
        w.run(query=(q[..., :512], q[..., 512:]), kv_cache=(split[0][:6], split[1][:6]))
    with pytest.raises(ValueError, match="planned query shape"):
        w.run(query=(q[:1, :, :512], q[:1, :, 512:]), kv_cache=split)


def _cuda_registry() -> KernelRegistry:
    from heteroserve.platforms.cpu import plugin as cpu_plugin
    from heteroserve.platforms.cuda import plugin as cuda_plugin

    registry = KernelRegistry()
    cpu_plugin.heteroserve_register_kernels(registry)
    cuda_plugin.heteroserve_register_kernels(registry)
    return registry


def _request(**fields: object) -> KernelRequest:
    base: dict[str, object] = dict(platform="cuda", device_type="cuda", dtype=torch.bfloat16,
                                   head_size=192, num_q_heads=16, num_kv_heads=16,
                                   page_size=16, kv_lora_rank=512, qk_rope_head_dim=64)
    return KernelRequest(**{**base, **fields})  # type: ignore[arg-type]


def test_registry_places_flashinfer_below_triton(flashinfer_double,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _cuda_registry()
    assert resolve_op(registry, ops.MLA_ATTENTION, _request()).chosen.name == "triton"
    forced = resolve_all(registry, _request(), parse_kernel_overrides(
        ["mla_attention=flashinfer"]))[ops.MLA_ATTENTION]
    assert forced.forced and forced.chosen.name == "flashinfer"
    assert forced.chosen.load().__name__ == "FlashInferMLA"
    from heteroserve.platforms.triton import registration

    monkeypatch.setattr(registration, "triton_missing", lambda: "triton is not installed")
    chosen = resolve_op(registry, ops.MLA_ATTENTION, _request())
    assert chosen.chosen.name == "flashinfer"  # above the torch-native fallback
    assert ("torch_native", "lower priority than flashinfer") in chosen.rejected


def test_supports_says_why(flashinfer_double) -> None:
    spec = _cuda_registry().get(ops.MLA_ATTENTION, "flashinfer", "cuda")
    assert spec.check(_request()).ok
    assert spec.check(_request(kv_lora_rank=None, qk_rope_head_dim=None)).ok  # not MLA yet
    refusals = {"bf16/fp16": _request(dtype=torch.float32),
                "kv_lora_rank 64": _request(kv_lora_rank=64),
                "qk_rope_head_dim 16": _request(qk_rope_head_dim=16),
                "model dtype": _request(kv_cache_dtype="fp8_e4m3"),
                "CUDA devices": _request(device_type="cpu")}
    for reason, request in refusals.items():
        support = spec.check(request)
        assert not support.ok and reason in support.reason, (reason, support.reason)


def test_supports_without_flashinfer() -> None:
    if importlib.util.find_spec("flashinfer") is not None:
        pytest.skip("a flashinfer is importable here")
    spec = _cuda_registry().get(ops.MLA_ATTENTION, "flashinfer", "cuda")
    assert spec.check(_request()).reason.startswith("flashinfer not installed")
    assert "flashinfer.mla" not in sys.modules


def test_conformance_mla_cases_pass_on_cuda_double() -> None:
    """The suite's MLA cases (quick grid) for ``flashinfer@cuda-double``: write_kv, extend
    with prefixes, decode and forward pass in bf16; fp32 and the small latent are refused."""
    env = {**os.environ, "HETEROSERVE_TEST_DOUBLES": "cuda",
           "PYTHONPATH": os.pathsep.join(
               [str(ROOT / "tests" / "vendor_doubles"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs",
         "heteroserve.conformance", "--platform", "cuda-double", "--conformance-quick", "-q",
         "-rA", "-k", "mla and flashinfer"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    passed = re.findall(r"^PASSED .*test_mla_(\w+)\[mla_attention-flashinfer@cuda-double-"
                        r"(\w+)-", out.stdout, re.M)
    kinds = {kind for kind, _ in passed}
    assert {"write_kv", "extend", "decode", "forward_decode"} <= kinds, kinds
    assert {dt for _, dt in passed} == {"bf16"}  # the quick grid's dtypes: fp32 (refused), bf16
    assert len(passed) >= 10, passed
