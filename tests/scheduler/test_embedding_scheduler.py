"""Embedding requests inside the scheduler: pooled over chunked-prefill steps, batched with
generation requests (which still generate what they generate alone), surviving retraction
and prefix-cache hits, against transformers' ``last_hidden_state``."""

from __future__ import annotations

import pytest
import torch

from engine_harness import cpu_args, run_scheduler
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.model_runner.pooling import EmbedSpec, PoolingType
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.scheduler import Req, Scheduler
from heteroserve.core.scheduler.sampling_params import SamplingParams

GEN = [list(range(5, 5 + n)) for n in (3, 17, 40, 9)]
EMB = [list(range(300, 300 + n)) for n in (1, 7, 33, 64)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=6)


@pytest.fixture(scope="module")
def hf(model):
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(model), dtype=torch.float32).eval()

    def embed(ids: list[int], pooling: PoolingType, normalize: bool) -> torch.Tensor:
        with torch.no_grad():
            h = m(torch.tensor([ids])).last_hidden_state[0].double()
        v = h[-1] if pooling is PoolingType.LAST else h.mean(0)
        return torch.nn.functional.normalize(v, dim=0) if normalize else v

    return embed


@pytest.fixture(scope="module")
def runner(model):
    return build_model_runner(cpu_args(model))[2]


@pytest.fixture(scope="module")
def alone(model, runner):
    """What each generation request of GEN generates on its own (16 greedy tokens)."""
    return {f"r{i}": run_scheduler(cpu_args(model), [g], runner=runner)[0]["r0"]
            for i, g in enumerate(GEN)}


def _embed_req(rid: str, ids: list[int], spec: EmbedSpec) -> Req:
    return Req(rid=rid, input_ids=ids, embed=spec, sampling_params=SamplingParams(max_new_tokens=0))


def _gen_req(rid: str, ids: list[int], n: int = 16) -> Req:
    return Req(rid=rid, input_ids=ids, sampling_params=SamplingParams(
        max_new_tokens=n, temperature=0.0, ignore_eos=True))


def _drain(sched: Scheduler) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Run ``sched`` dry: generated tokens per rid, embeddings per rid."""
    tokens: dict[str, list[int]] = {}
    vectors: dict[str, list[float]] = {}
    for _ in range(10_000):
        if not sched.has_work():
            break
        for o in sched.step():
            tokens.setdefault(o.rid, []).extend(o.new_token_ids)
            if o.embedding is not None:
                assert o.finish is not None and o.rid not in vectors
                vectors[o.rid] = o.embedding
    return tokens, vectors


def _close(got: list[float], want: torch.Tensor) -> bool:
    return (torch.tensor(got, dtype=torch.float64) - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("pooling", list(PoolingType))
def test_chunked_mixed_batches_match_references(model, runner, alone, hf, pooling) -> None:
    spec = EmbedSpec(pooling, normalize=pooling is PoolingType.LAST)
    sched = Scheduler(runner, cpu_args(model, chunked_prefill_size=8), [], runner.page_size)
    for i, (g, e) in enumerate(zip(GEN, EMB)):  # interleaved arrivals
        sched.add_request(_gen_req(f"r{i}", g))
        sched.add_request(_embed_req(f"e{i}", e, spec))
    tokens, vectors = _drain(sched)
    assert {k: v for k, v in tokens.items() if k.startswith("r")} == alone
    assert all(not tokens[f"e{i}"] for i in range(len(EMB)))
    for i, ids in enumerate(EMB):
        assert _close(vectors[f"e{i}"], hf(ids, pooling, spec.normalize)), f"e{i}"
    assert sched.allocator.num_free + sched.cache.cached_pages == sched.allocator.capacity


def test_embedding_request_in_a_tight_pool(model, runner, hf) -> None:
    """A long embedding request next to a decoding one in a pool that cannot hold both:
    it takes its pages at admission, so it is never retracted mid-prefill (which would
    recompute it), and both results are exact."""
    args = cpu_args(model, max_total_tokens=128, page_size=4, chunked_prefill_size=8)
    _, _, small = build_model_runner(args)
    sched = Scheduler(small, args, [], small.page_size)
    gen, emb = list(range(5, 45)), list(range(300, 400))
    sched.add_request(_gen_req("r0", gen, 60))
    sched.add_request(_embed_req("e0", emb, EmbedSpec(PoolingType.MEAN)))
    tokens, vectors = _drain(sched)
    assert sched.get_stats()["num_retractions"] == 0
    assert _close(vectors["e0"], hf(emb, PoolingType.MEAN, True))
    assert tokens["r0"] == run_scheduler(cpu_args(model), [gen], runner=runner,
                                         max_new_tokens=60)[0]["r0"]


def test_cached_prefix_is_recomputed_for_mean_and_reused_for_last(model, runner, hf) -> None:
    sched = Scheduler(runner, cpu_args(model), [], runner.page_size)
    ids = list(range(400, 464))
    cached = {}
    for rid, pooling in (("warm", PoolingType.LAST), ("mean", PoolingType.MEAN),
                         ("last", PoolingType.LAST)):
        sched.add_request(_embed_req(rid, ids, EmbedSpec(pooling)))
        while sched.has_work():
            for o in sched.step():
                if o.finish is not None:
                    cached[rid] = o.cached_tokens
                    assert _close(o.embedding, hf(ids, pooling, True)), rid
    assert cached["warm"] == 0 and cached["mean"] == 0 and cached["last"] > 0


def test_embedding_request_must_not_generate() -> None:
    with pytest.raises(ValueError, match="max_new_tokens 0"):
        Req(rid="x", input_ids=[1, 2], embed=EmbedSpec(),
            sampling_params=SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="pooling must be one of"):
        EmbedSpec.of("cls")


def test_forward_batch_names_the_pooled_rows() -> None:
    from heteroserve.core.kernels.attention import ForwardMode
    from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch

    seqs = [SequenceInput([1, 2, 3], 0, [0], pool=PoolingType.MEAN),
            SequenceInput([4, 5], 0, [1]),
            SequenceInput([6, 7, 8, 9], 4, [2, 3], pool=PoolingType.LAST)]
    fb = build_forward_batch(seqs, ForwardMode.EXTEND, 4, torch.device("cpu"))
    assert fb.pooling is not None and fb.pooling.num_pooled == 2
    assert fb.pooling.rows.tolist() == [0, 1, 2, 8]
    assert fb.pooling.segments.tolist() == [0, 0, 0, 1]
    assert build_forward_batch(seqs[1:2], ForwardMode.EXTEND, 4, torch.device("cpu")).pooling is None
