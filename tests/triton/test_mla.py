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


@pytest.mark.parametrize("mode,fused_max_batch", [("decode", None), ("decode", 0),
                                                  ("extend", None)],
                         ids=["decode-absorb-kernels", "decode-bmm", "extend"])
def test_forward_norms_the_latent_it_stores(device, mode, fused_max_batch) -> None:
    """``forward`` with a ``LatentNorm`` stores ``norm_latent(latent)`` (the rms_norm op's
    meaning) in the new slots, leaves the rest alone, and attends over the stored rows."""
    from heteroserve.core.kernels.mla import LatentNorm, norm_latent
    from heteroserve.platforms.triton.mla import TritonMLA

    heads, (c, dn, r, dv), page = 4, (64, 32, 16, 48), 16
    seqs = ((6, 1), (20, 1)) if mode == "decode" else ((0, 5), (9, 3))
    gen = torch.Generator().manual_seed(21)
    batch = build_batch(seqs, page, ForwardMode.DECODE if mode == "decode" else
                        ForwardMode.EXTEND, device, gen)
    backend = TritonMLA(MLAConfig(heads, c, dn, r, dv, page, torch.float32, device,
                                  max_context_len=512))
    if fused_max_batch is not None:
        backend.fused_max_batch = fused_max_batch
    assert backend.norms_latent
    cache = torch.full(backend.kv_cache_shape(batch.num_pages), SENTINEL, device=device)
    rows = [torch.randn(p + n, c + r, generator=gen) for p, n in seqs]
    for b, (p, _) in enumerate(seqs):
        cache.view(-1, c + r)[batch.slots(b, 0, p).to(device)] = rows[b][:p].to(device)
    raw = torch.cat([x[p:] for x, (p, _) in zip(rows, seqs)]) * 3.0 + 0.5
    norm = LatentNorm(torch.rand(c, generator=gen) + 0.5, 1e-6)
    normed = norm_latent(raw[:, :c], norm)
    t = raw.shape[0]
    q_nope = torch.randn(t, heads, dn, generator=gen)
    q_pe = torch.randn(t, heads, r, generator=gen)
    w_kc = torch.randn(heads, dn, c, generator=gen) * c ** -0.5
    w_vc = torch.randn(heads, dv, c, generator=gen) * c ** -0.5
    layer = MLALayer(0, (dn + r) ** -0.5)
    backend.prepare(batch.meta)
    dev = lambda x: x.to(device)  # noqa: E731
    out = backend.forward(dev(q_nope), dev(q_pe), dev(raw[:, :c]), dev(raw[:, c:]), cache,
                          dev(w_kc), dev(w_vc), layer, batch.meta,
                          latent_norm=LatentNorm(dev(norm.weight), norm.eps))
    stored = cache.view(-1, c + r).cpu()[batch.meta.out_cache_loc.cpu()]
    assert rel_err(stored[:, :c], normed) < 1e-6 and torch.equal(stored[:, c:], raw[:, c:])
    full, at = [], 0
    for x, (p, n) in zip(rows, seqs):
        full.append(torch.cat([x[:p], torch.cat([normed[at:at + n], raw[at:at + n, c:]], 1)]))
        at += n
    ref = mla_ref(q_nope, q_pe, [x[:, :c] for x in full], [x[:, c:] for x in full], w_kc,
                  w_vc, [n for _, n in seqs], layer.scale)
    assert rel_err(out, ref) < 2e-4


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
