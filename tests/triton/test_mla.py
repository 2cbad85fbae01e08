"""TritonMLA decode (absorbed, split-KV over the latent cache) against the float64 MLA oracle,
on small fp32 shapes (interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.conformance.oracles.mla import mla as mla_ref
from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.kernels.mla import MLAConfig, MLALayer

SENTINEL = 1234.5


@pytest.mark.parametrize("fused_max_batch", [None, 0], ids=["absorb-kernels", "bmm"])
@pytest.mark.parametrize("heads,dims,page,lens,splits_ctx", [
    (20, (64, 32, 16, 48), 1, (1, 2, 17, 40), 8192),   # two head blocks, one partial
    (3, (64, 32, 16, 48), 16, (5, 33), 256),            # one split per sequence
    (16, (512, 128, 64, 128), 16, (3, 20), 8192),       # DeepSeek's latent widths
])
def test_triton_mla_decode_matches_oracle(device, heads, dims, page, lens, splits_ctx,
                                          fused_max_batch) -> None:
    """Both decode paths: the Triton absorb kernels (small batches, latent write folded in)
    and the BMMs around the split kernel and merge (``fused_max_batch`` 0)."""
    from heteroserve.platforms.triton.mla import TritonMLA

    c, dn, r, dv = dims
    seqs = tuple((n - 1, 1) for n in lens)
    gen = torch.Generator().manual_seed(heads * 1000 + c + page)
    batch = build_batch(seqs, page, ForwardMode.DECODE, device, gen)
    backend = TritonMLA(MLAConfig(heads, c, dn, r, dv, page, torch.float32, device,
                                  max_context_len=splits_ctx))
    if fused_max_batch is not None:
        backend.fused_max_batch = fused_max_batch
    cache = torch.full(backend.kv_cache_shape(batch.num_pages), SENTINEL, device=device)
    rows = [torch.randn(n, c + r, generator=gen) for n in lens]
    for b, (p, _) in enumerate(seqs):
        cache.view(-1, c + r)[batch.slots(b, 0, p).to(device)] = rows[b][:p].to(device)
    new = torch.cat([x[-1:] for x in rows]).to(device)
    q_nope = torch.randn(len(lens), heads, dn, generator=gen).to(device)
    q_pe = torch.randn(len(lens), heads, r, generator=gen).to(device)
    w_kc = (torch.randn(heads, dn, c, generator=gen) * c ** -0.5).to(device)
    w_vc = (torch.randn(heads, dv, c, generator=gen) * c ** -0.5).to(device)
    layer = MLALayer(0, (dn + r) ** -0.5)

    backend.prepare(batch.meta)
    # latent / k_pe as strided views of one [T, c + r] projection (Triton write_kv takes rows
    # of any stride)
    out = backend.forward(q_nope, q_pe, new[:, :c], new[:, c:], cache,
                          w_kc, w_vc, layer, batch.meta)
    ref = mla_ref(q_nope, q_pe, [x[:, :c] for x in rows], [x[:, c:] for x in rows], w_kc, w_vc,
                  [1] * len(lens), layer.scale)
    assert out.shape == (len(lens), heads, dv)
    assert rel_err(out, ref) < 2e-4
    assert torch.equal(cache.view(-1, c + r).cpu()[batch.meta.out_cache_loc.cpu()], new.cpu())


def test_tiny_deepseek_v3_with_triton_mla_matches_transformers(device, tmp_path) -> None:
    """The model's MLA layers driving TritonMLA (decode, interpreted) give transformers'
    logits. With a GPU the cuda platform resolves TritonMLA itself (run the model parity
    tests with ``HETEROSERVE_TEST_PLATFORM=cuda``)."""
    if device.type != "cpu":
        pytest.skip("interpreter-only check; on a GPU the model parity tests cover it")
    import transformers
    from engine_harness import PagedSequence, cpu_args, decode, extend

    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.models.tiny import build_tiny_model
    from heteroserve.platforms.triton.mla import TritonMLA

    path = build_tiny_model(tmp_path / "dsv3", "deepseek_v3", seed=3)
    _, _, runner = build_model_runner(cpu_args(path))
    runner.backend = TritonMLA(runner.backend.config)  # the cpu platform resolves torch_native
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [11, 57, 3, 200, 42, 9, 77]
    seq = PagedSequence(runner, len(prompt) + 4)
    ours = extend(runner, [(prompt, 0, seq)])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(3):
            token = int(ours.argmax())
            ours = decode(runner, [(token, len(ids), seq)])[0]
            ids.append(token)
            ref = hf(torch.tensor([ids])).logits[0, -1]
            assert rel_err(ours, ref) < 1e-4


def test_decode_graph_replay_with_triton_mla_equals_eager(device, tmp_path) -> None:
    """Decode graphs (the cpu platform's eager stand-in; padded rows on page 0) over a
    DeepSeek model with TritonMLA equal eager decode: what a CUDA capture replays."""
    from engine_harness import PagedSequence, cpu_args, extend

    from heteroserve.core.kernels.attention import ForwardMode as Mode
    from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.model_runner.graph_decode import DecodeGraphs
    from heteroserve.core.models.tiny import build_tiny_model
    from heteroserve.platforms.triton.mla import TritonMLA

    if device.type != "cpu":
        pytest.skip("interpreter-only check; on a GPU the cuda conformance model check covers it")
    path = build_tiny_model(tmp_path / "dsv3", "deepseek_v3", seed=4)
    _, _, runner = build_model_runner(cpu_args(path, cuda_graph_max_bs=4, max_running_requests=4))
    runner.backend = TritonMLA(runner.backend.config)
    graphs = DecodeGraphs(runner)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    seqs = [PagedSequence(runner, len(p) + 1) for p in prompts]
    tokens = [int(r.argmax()) for r in extend(runner, [(p, 0, s) for p, s in zip(prompts, seqs)])]
    fb = build_forward_batch([SequenceInput([t], len(p), s.pages)
                              for t, p, s in zip(tokens, prompts, seqs)],
                             Mode.DECODE, runner.page_size, runner.device)
    eager = runner.forward_eager(fb).clone()
    replayed = graphs.run(fb)
    assert replayed is not None and replayed.shape == eager.shape
    assert rel_err(replayed, eager) < 1e-5


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("heads,dims,lens", [
    (16, (512, 128, 64, 128), (3, 20)),      # DeepSeek's widths
    (3, (64, 32, 16, 48), (1, 9, 33)),       # a small odd shape, three sequences
])
def test_forward_prologue_equals_the_separate_ops(device, heads, dims, lens, is_neox) -> None:
    """``forward_prologue`` (the latent norm and both rotations inside the absorbed-query
    kernel) against the Triton RMSNorm and rotary kernels followed by ``forward``: the same
    cache rows and output (fp32), inputs untouched; extend and batches past
    ``fused_max_batch`` return None."""
    from heteroserve.core.kernels.mla import MLAPrologue
    from heteroserve.platforms.triton.mla import TritonMLA
    from heteroserve.platforms.triton.norm import rms_norm
    from heteroserve.platforms.triton.rotary import apply_rotary
    from heteroserve.conformance.oracles.rotary import cos_sin_cache

    c, dn, r, dv = dims
    seqs = tuple((n - 1, 1) for n in lens)
    gen = torch.Generator().manual_seed(heads + c + int(is_neox))
    batch = build_batch(seqs, 16, ForwardMode.DECODE, device, gen)
    backend = TritonMLA(MLAConfig(heads, c, dn, r, dv, 16, torch.float32, device))
    caches = [torch.full(backend.kv_cache_shape(batch.num_pages), SENTINEL, device=device)
              for _ in range(2)]
    q = torch.randn(len(lens), heads, dn + r, generator=gen).to(device)
    kv_a = (torch.randn(len(lens), c + r, generator=gen) * 3.0).to(device)
    w_kc = (torch.randn(heads, dn, c, generator=gen) * c ** -0.5).to(device)
    w_vc = (torch.randn(heads, dv, c, generator=gen) * c ** -0.5).to(device)
    norm_w = (torch.rand(c, generator=gen) + 0.5).to(device)
    positions = torch.tensor([p for p, _ in seqs], device=device)
    table = cos_sin_cache(64, r).float().to(device)
    layer = MLALayer(0, (dn + r) ** -0.5)
    before = (q.clone(), kv_a.clone())
    backend.prepare(batch.meta)
    prologue = MLAPrologue(norm_w, 1e-6, positions, table, is_neox)
    fused = backend.forward_prologue(q[..., :dn], q[..., dn:], kv_a[:, :c], kv_a[:, c:],
                                     prologue, caches[0], w_kc, w_vc, layer, batch.meta)
    assert fused is not None
    assert torch.equal(q, before[0]) and torch.equal(kv_a, before[1])
    q_pe, k_pe = apply_rotary(positions, q[..., dn:].clone(), kv_a[:, None, c:].clone(), table,
                              is_neox)
    separate = backend.forward(q[..., :dn], q_pe, rms_norm(kv_a[:, :c], norm_w, 1e-6),
                               k_pe[:, 0], caches[1], w_kc, w_vc, layer, batch.meta)
    torch.testing.assert_close(caches[0].cpu(), caches[1].cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.cpu(), separate.cpu(), rtol=1e-5, atol=1e-6)
    backend.fused_max_batch = 0
    assert backend.forward_prologue(q[..., :dn], q[..., dn:], kv_a[:, :c], kv_a[:, c:],
                                    prologue, caches[0], w_kc, w_vc, layer, batch.meta) is None


def test_absorb_query_with_prologue_compiles_for_hopper_with_pdl() -> None:
    """The absorbed-query kernel with the latent norm and rotations folded in, at
    DeepSeek-V2-Lite's bf16 shape, builds for sm_90a and keeps its PDL wait (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from ptx_check import hopper_ptx

    ptrs = {"q_nope_ptr": "*bf16", "w_kc_ptr": "*bf16", "q_lat_ptr": "*bf16",
            "latent_ptr": "*bf16", "k_pe_ptr": "*bf16", "cache_ptr": "*bf16", "loc_ptr": "*i64",
            "batch": "i32", "q_pe_ptr": "*bf16", "q_pe_out_ptr": "*bf16",
            "norm_w_ptr": "*bf16", "pos_ptr": "*i64", "cos_sin_ptr": "*fp32", "eps": "fp32"}
    strides = ["stride_qb", "stride_qh", "stride_wh", "stride_wd", "stride_lb", "stride_lh",
               "stride_nt", "stride_kt", "stride_cs", "stride_pb", "stride_ph", "stride_ob",
               "stride_oh", "stride_cos"]
    consts = {"NOPE": 128, "LORA": 512, "ROPE": 64, "BLOCK_D": 128, "BLOCK_C": 64,
              "BLOCK_L": 512, "BLOCK_R": 64, "WRITE_KV": True, "PROLOGUE": True,
              "IS_NEOX": False, "USE_PDL": True}
    sig = {**ptrs, **dict.fromkeys(strides, "i32"), **dict.fromkeys(consts, "constexpr")}
    job = {"kernel": "_absorb_query_kernel", "module": "heteroserve.platforms.triton.mla_absorb",
           "signature": sig, "num_warps": 4, "aligned": [], "constexprs": consts}
    (result,) = hopper_ptx([job])
    assert result["griddepcontrol_wait"], "the kernel waits for the projection (PDL)"
