"""cuda's ``TritonAttentionFlashInferExtend`` on the host, with the flashinfer double: steps of
long extends (prefix and chunk in one call) go to flashinfer's paged prefill and match the
float64 reference; shorter extends and decode stay on the Triton kernels; configs flashinfer
cannot serve keep every extend on Triton and say why; the start-up warm-up plans and runs one
long extend."""

from __future__ import annotations

import pytest
import torch
from heteroserve_vendor_doubles.batches import build_scenario, reference_attention

from heteroserve.conformance.checks import rel_err
from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer
from heteroserve.platforms.triton.attention import TritonAttention

HQ, HK, D, PAGE = 4, 2, 64, 4


def _backend(dtype: torch.dtype = torch.bfloat16, kv_cache_dtype: torch.dtype | None = None,
             head_size: int = D):
    from heteroserve.platforms.cuda.flashinfer_extend import TritonAttentionFlashInferExtend

    class Small(TritonAttentionFlashInferExtend):
        min_new_tokens = 8  # what 2048 is on a GPU, at test sizes

    return Small(AttentionConfig(HQ, HK, head_size, PAGE, dtype, torch.device("cpu"),
                                 kv_cache_dtype=kv_cache_dtype))


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which kernel family served each extend."""
    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention

    calls: list[str] = []
    for name, cls in (("flashinfer", FlashInferAttention), ("triton", TritonAttention)):
        original = cls.extend

        def extend(self, *args, _original=original, _name=name):
            calls.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(cls, "extend", extend)
    return calls


@pytest.mark.parametrize("seq_lens,prefix_lens", [([12], [0]), ([21, 9], [9, 0])],
                         ids=["prompt", "chunk-on-prefix-and-prompt"])
def test_long_extends_go_to_flashinfer(flashinfer_double, monkeypatch, seq_lens,
                                       prefix_lens) -> None:
    backend = _backend()
    calls = _spy(monkeypatch)
    sc = build_scenario(seq_lens, prefix_lens, page_size=PAGE, num_q_heads=HQ,
                        num_kv_heads=HK, head_size=D, dtype=torch.bfloat16, seed=5)
    layer = AttentionLayer(0, D ** -0.5)
    backend.prepare(sc.meta)
    out = backend.forward(sc.q, sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, layer, sc.meta)
    assert calls[-1] == "flashinfer"
    assert rel_err(out, reference_attention(sc, layer.scale)) < 2e-2


def test_short_extends_and_decode_stay_on_triton(flashinfer_double, monkeypatch) -> None:
    backend = _backend()
    calls = _spy(monkeypatch)
    layer = AttentionLayer(0, D ** -0.5)
    short = build_scenario([20, 7], [14, 0], page_size=PAGE, num_q_heads=HQ, num_kv_heads=HK,
                           head_size=D, dtype=torch.bfloat16, seed=6)  # 6 new tokens < 8
    backend.prepare(short.meta)
    backend.extend(short.q, short.k_cache, short.v_cache, layer, short.meta)
    assert calls == ["triton"]
    decode = build_scenario([9, 5], [8, 4], page_size=PAGE, num_q_heads=HQ, num_kv_heads=HK,
                            head_size=D, dtype=torch.bfloat16, seed=7)
    backend.prepare(decode.meta)
    backend.forward(decode.q, decode.k_new, decode.v_new, decode.k_cache, decode.v_cache,
                    layer, decode.meta)
    assert calls == ["triton"]  # decode never reaches an extend


@pytest.mark.parametrize("kwargs,reason", [
    (dict(dtype=torch.float32), "bf16/fp16"),
    (dict(kv_cache_dtype=torch.float8_e4m3fn), "KV cache"),
    (dict(head_size=96), "head sizes"),
])
def test_configs_flashinfer_cannot_serve_keep_triton(flashinfer_double, kwargs, reason) -> None:
    backend = _backend(**kwargs)
    assert backend.refusal is not None and reason in backend.refusal
    assert reason in backend.warm_up(4096, 8192)


def test_warm_up_runs_one_long_extend(flashinfer_double, monkeypatch) -> None:
    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention

    runs: list[tuple[int, ...]] = []
    backend = _backend()
    make = FlashInferAttention.prefill_wrapper

    def spying_wrapper(self):
        wrapper = make(self)
        original = wrapper.run

        def run(q, kv, *args, **kwargs):
            runs.append(tuple(q.shape))
            return original(q, kv, *args, **kwargs)
        wrapper.run = run
        return wrapper
    monkeypatch.setattr(FlashInferAttention, "prefill_wrapper", spying_wrapper)
    note = backend.warm_up(4096, 8192)
    assert note is not None and "ready" in note
    assert runs == [(8, HQ, D)]
    assert backend.warm_up(4096, 4) is None  # chunks shorter than a long extend: nothing
