"""cuda's ``TritonAttentionSDPAExtend`` on the host: its dense extend (gather per sequence;
a whole prompt in one causal call, a chunk on a cached prefix as two calls in bucketed shapes
merged by their log-sum-exp) against the float64 oracle, the shapes the cuDNN calls see, and
which steps it leaves to the Triton kernel. Torch's cuDNN and flash kernels themselves run in
the cuda conformance suite (the ``-prompt``, ``-chunk`` and ``-longchunk`` extend cases)."""

from __future__ import annotations

import math

import pytest
import torch

from heteroserve.conformance.oracles.attention import attention as attention_ref
from heteroserve.conformance.paged import metadata_for
from heteroserve.core.kernels.attention import (
    AttentionConfig, AttentionLayer, AttentionPrologue, ForwardMode,
)
from heteroserve.platforms.cuda import sdpa_extend
from heteroserve.platforms.cuda.sdpa_extend import (
    TritonAttentionSDPAExtend, bucketed_split, cudnn_usable, flash_usable, merge_attention,
    warm_up_extends,
)
from heteroserve.platforms.triton.attention import TritonAttention
from heteroserve.platforms.triton.qk_norm import qk_norm_rotary
from heteroserve.platforms.triton.rotary import apply_rotary

HQ, HK, D = 8, 2, 64


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out in q.dtype, lse fp32)`` of ``q [1, Hq, n, D]`` over ``k/v [1, Hk, L, D]``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    s = q.float() @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v).to(q.dtype), torch.logsumexp(s, -1)


class _HostSDPA(TritonAttentionSDPAExtend):
    """The dense path on CPU tensors: float math with its log-sum-exp stands in for the fused
    kernels and records each call: ``(queries, keys, causal)`` of cuDNN's in ``cudnn_shapes``,
    the query count of flash's in ``flash_calls``; ``refuse`` makes cuDNN (``"cudnn"``) or
    both (``"all"``) answer as if they did not take the shapes."""

    min_new_tokens = 8
    refuse = ""
    fused_device_type = "cpu"

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        self.cudnn_shapes: list[tuple[int, int, bool]] = []
        self.flash_calls: list[int] = []
        #: what torch keys a cuDNN plan on: sizes and strides of q, k, v, and the mask
        self.plan_keys: set[tuple] = set()

    def _cudnn(self, q, k, v, causal, scale, with_lse):
        if self.refuse:
            return None
        self.cudnn_shapes.append((q.shape[2], k.shape[2], causal))
        self.plan_keys.add((*((tuple(t.shape), t.stride()) for t in (q, k, v)), causal))
        out, lse = _math_attention(q, k, v, causal, scale)
        return out, (lse if with_lse else None)

    def _flash_causal(self, q, k, v, scale):
        if self.refuse == "all":
            return None
        self.flash_calls.append(q.shape[2])
        return _math_attention(q, k, v, True, scale)[0]


@pytest.fixture(autouse=True)
def _small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets small enough for host-sized sequences to split their prefixes and pad."""
    monkeypatch.setattr(sdpa_extend, "PREFIX_BUCKET", 16)
    monkeypatch.setattr(sdpa_extend, "QUERY_BUCKET", 8)


def _setup(seqs: tuple[tuple[int, int], ...], page_size: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = AttentionConfig(num_q_heads=HQ, num_kv_heads=HK, head_size=D, page_size=page_size,
                          dtype=dtype, device=torch.device("cpu"))
    backend = _HostSDPA(cfg)
    counts = [-(-(p + n) // page_size) for p, n in seqs]
    perm = (torch.randperm(sum(counts) + 4, generator=gen) + 1).tolist()
    pages, at = [], 0
    for c in counts:
        pages.append(perm[at:at + c])
        at += c
    meta = metadata_for(pages, seqs, page_size, ForwardMode.EXTEND, torch.device("cpu"))
    shape = backend.kv_cache_shape(max(perm) + 1)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    keys = [torch.randn(p + n, HK, D, generator=gen).to(dtype) for p, n in seqs]
    values = [torch.randn(p + n, HK, D, generator=gen).to(dtype) for p, n in seqs]
    for b, (p, n) in enumerate(seqs):
        for pos in range(p + n):
            page, off = pages[b][pos // page_size], pos % page_size
            k_cache[page, off], v_cache[page, off] = keys[b][pos], values[b][pos]
    q = torch.randn(sum(n for _, n in seqs), HQ, D, generator=gen).to(dtype)
    return backend, meta, q, k_cache, v_cache, keys, values


@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [((0, 40), (0, 20), (0, 9)), ((30, 40), (0, 20), (7, 9)),
                                  ((32, 16), (48, 9))],
                         ids=["prompts", "chunks-on-prefixes", "bucket-multiples"])
def test_dense_extend_matches_the_oracle(page_size: int, dtype: torch.dtype,
                                         seqs: tuple[tuple[int, int], ...]) -> None:
    backend, meta, q, k_cache, v_cache, keys, values = _setup(seqs, page_size, dtype)
    layer = AttentionLayer(layer_id=0, scale=1 / math.sqrt(D))
    out = backend.extend(q, k_cache, v_cache, layer, meta)
    ref = attention_ref(q, keys, values, [n for _, n in seqs], layer.scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_unfused_merge_matches_the_oracle_too() -> None:
    seqs = ((30, 40), (7, 9))
    backend, meta, q, k_cache, v_cache, keys, values = _setup(seqs, 16, torch.bfloat16)
    backend.fused_merge = False
    out = backend.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
    ref = attention_ref(q, keys, values, [n for _, n in seqs], 0.1)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


class _LayoutMatchingSDPA(_HostSDPA):
    """cuDNN's output allocation as torch makes it: in the query's layout (here the
    ``[n, Hq, D]`` rows of the gathered sequence); records each output's address."""

    def _cudnn(self, q, k, v, causal, scale, with_lse):
        res = super()._cudnn(q, k, v, causal, scale, with_lse)
        if res is None:
            return None
        out = torch.empty_like(q)  # keeps q's strides
        out.copy_(res[0])
        self.outputs = getattr(self, "outputs", []) + [out.data_ptr()]
        return out, res[1]


@pytest.mark.parametrize(("seqs", "no_copy"), [(((0, 40),), True), (((0, 37),), False),
                                               (((0, 40), (0, 16)), False)],
                         ids=["one-prompt", "one-padded-prompt", "two-prompts"])
def test_one_prompt_step_returns_cudnn_output_without_a_copy(seqs, no_copy: bool) -> None:
    """A step of one unpadded prompt returns cuDNN's output itself; a padded one (F.pad
    lays the query out head-major, and the output follows) and a step of several
    sequences copy into the step's output."""
    backend, meta, q, k_cache, v_cache, keys, values = _setup(seqs, 16, torch.bfloat16)
    backend.__class__ = _LayoutMatchingSDPA
    out = backend.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
    ref = attention_ref(q, keys, values, [n for _, n in seqs], 0.1)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert out.shape == q.shape and out.is_contiguous()
    _, r, _ = bucketed_split(0, seqs[0][1])
    own = backend.outputs[0] + r * HQ * D * out.element_size()
    assert (out.data_ptr() == own) == no_copy
    backend.return_kernel_output = False  # the knob of the side-by-side runs: always a copy
    again = backend.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
    assert torch.equal(again, out) and again.data_ptr() != backend.outputs[-1]


def test_merge_of_two_key_sets_is_attention_over_both() -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 32, generator=gen)
    k, v = torch.randn(1, 2, 50, 32, generator=gen), torch.randn(1, 2, 50, 32, generator=gen)
    whole, _ = _math_attention(q, k, v, False, 0.2)
    o1, l1 = _math_attention(q, k[:, :, :17], v[:, :, :17], False, 0.2)
    o2, l2 = _math_attention(q, k[:, :, 17:], v[:, :, 17:], False, 0.2)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), whole, atol=1e-5, rtol=1e-5)


def test_cudnn_sees_only_bucketed_shapes() -> None:
    """Each chunk's calls are ``[m] x [P_b]`` unmasked and ``[m] x [m]`` causal, ``m`` a
    multiple of the query bucket and ``P_b`` of the prefix bucket, whatever the lengths."""
    seqs = ((0, 13), (5, 9), (16, 8), (37, 11), (70, 25))
    backend, meta, q, k_cache, v_cache, keys, values = _setup(seqs, 16, torch.bfloat16)
    out = backend.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
    torch.testing.assert_close(out.double(), attention_ref(q, keys, values, [n for _, n in seqs],
                                                           0.1), atol=2e-2, rtol=2e-2)
    expected = []
    for prefix, new in seqs:
        p_b, r, m = bucketed_split(prefix, new)
        assert m % 8 == 0 and p_b % 16 == 0 and r < 16 and m >= r + new
        expected += [(m, m, True)] + ([(m, p_b, False)] if p_b else [])
    assert backend.cudnn_shapes == expected
    assert {s for s in backend.cudnn_shapes if not s[2]} == {(8, 16, False), (16, 32, False),
                                                               (32, 64, False)}


@pytest.mark.parametrize("refuse", ["", "cudnn"])
def test_prompts_go_to_flash_where_cudnn_refuses_them(refuse: str) -> None:
    backend, meta, q, k_cache, v_cache, keys, values = _setup(((0, 40), (0, 20)), 16,
                                                              torch.float16)
    backend.refuse = refuse
    out = backend.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
    torch.testing.assert_close(out.double(), attention_ref(q, keys, values, [40, 20], 0.1),
                               atol=2e-2, rtol=2e-2)
    assert backend.flash_calls == ([40, 20] if refuse else [])
    assert backend.cudnn_shapes == ([] if refuse else [(40, 40, True), (24, 24, True)])


@pytest.mark.parametrize("change", ["window", "cap", "short", "fp32", "no-fused-kernel",
                                    "cudnn-refuses-the-chunk", "chunks-knob-off"])
def test_steps_it_leaves_to_triton(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seqs = ((0, 40), (5, 4 if change == "short" else 12))
    dtype = torch.float32 if change == "fp32" else torch.bfloat16
    backend, meta, q, k_cache, v_cache, _, _ = _setup(seqs, 16, dtype)
    backend.refuse = {"no-fused-kernel": "all", "cudnn-refuses-the-chunk": "cudnn"}.get(change, "")
    backend.cudnn_chunks = change != "chunks-knob-off"
    layer = AttentionLayer(layer_id=0, scale=0.1, sliding_window=8 if change == "window" else None,
                           logit_cap=3.0 if change == "cap" else None)
    calls = []
    monkeypatch.setattr(TritonAttention, "extend", lambda self, *a: calls.append(a) or a[0])
    backend.extend(q, k_cache, v_cache, layer, meta)
    assert len(calls) == 1


def test_fused_kernels_are_never_claimed_off_cuda() -> None:
    t = torch.zeros(1, HQ, 4, D, dtype=torch.bfloat16)
    assert not flash_usable(t, t[:, :HK], t[:, :HK])
    assert not cudnn_usable(t, t[:, :HK], t[:, :HK], True)


def _chunked_prompt_keys(backend: _HostSDPA, length: int, chunk: int) -> None:
    """Run each chunk of one ``length``-token prompt as its own extend step."""
    for prefix in range(0, length, chunk):
        new = min(chunk, length - prefix)
        b, meta, q, k_cache, v_cache, _, _ = _setup(((prefix, new),), 16, torch.bfloat16,
                                                    seed=prefix)
        b.extend(q, k_cache, v_cache, AttentionLayer(layer_id=0, scale=0.1), meta)
        backend.plan_keys |= b.plan_keys


def test_plans_repeat_across_sequence_lengths() -> None:
    """Two prompts of different lengths, chunked alike, key the same cuDNN plans for their
    common chunks (sizes and strides: a gathered sequence's length is in neither)."""
    keys = []
    for length in (48, 64):
        backend = _HostSDPA(AttentionConfig(HQ, HK, D, 16, torch.bfloat16, torch.device("cpu")))
        _chunked_prompt_keys(backend, length, 16)
        keys.append(backend.plan_keys)
    assert keys[0] < keys[1]


def test_warm_up_builds_the_plans_of_chunked_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdpa_extend, "MIN_NEW_TOKENS", 8)
    assert warm_up_extends(64, 16) == [(0, 16), (16, 16), (32, 16), (48, 16), (0, 15)]
    assert warm_up_extends(64, 4) == []
    cfg = AttentionConfig(HQ, HK, D, 16, torch.bfloat16, torch.device("cpu"))
    warmed = _HostSDPA(cfg)
    note = warmed.warm_up(64, 16)
    assert note is not None and note.startswith("cuDNN plans of 5 long extends")
    served = _HostSDPA(cfg)
    _chunked_prompt_keys(served, 64, 16)  # every full chunk of the longest prompt
    _chunked_prompt_keys(served, 13, 16)  # a short prompt, padded to one query bucket
    assert served.plan_keys and served.plan_keys <= warmed.plan_keys
    assert TritonAttentionSDPAExtend(cfg).warm_up(64, 16) is None  # no fused kernels on cpu
    warmed.refuse = "cudnn"
    assert warmed.warm_up(64, 16).endswith("stopped: cuDNN refuses 16 tokens on 0")


class _RowsRecordingSDPA(_HostSDPA):
    """Records where each sequence's queries reach the fused kernels: ``(storage, address)``."""

    def _sequence(self, q, k, v, prefix, scale, out):
        self.q_at = getattr(self, "q_at", []) + [(q.untyped_storage().data_ptr(), q.data_ptr())]
        return super()._sequence(q, k, v, prefix, scale, out)


def _new_tokens(seqs: tuple[tuple[int, int], ...], rot: int, seed: int = 5):
    """Un-rotated new q / k / v as strided views of one qkv projection output, their positions
    and a rotary cache of width ``rot``."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(n for _, n in seqs)
    qkv = torch.randn(t, (HQ + 2 * HK) * D, generator=gen).to(torch.bfloat16)
    q = qkv[:, :HQ * D].view(t, HQ, D)
    k = qkv[:, HQ * D:(HQ + HK) * D].view(t, HK, D)
    v = qkv[:, (HQ + HK) * D:].view(t, HK, D)
    positions = torch.cat([torch.arange(p, p + n) for p, n in seqs])
    return qkv, q, k, v, positions, torch.randn(128, rot, generator=gen)


@pytest.mark.parametrize("norm", ["none", "qk-norm", "qk-norm-partial"])
@pytest.mark.parametrize("seqs", [((0, 40),), ((0, 40), (16, 20))], ids=["prompt", "two"])
def test_extend_prologue_rotates_into_rows_the_fused_kernels_take(seqs, norm: str) -> None:
    """A dense extend's prologue: the same output and caches as the layer's ops (the rotary
    op, or with per-head norms the fused norm + rotary op, at any rotation width) in place
    then :meth:`forward`, bitwise; the projection output untouched; every sequence's queries
    reach the fused kernels as views of the one rotated buffer, each at its rows (no copy)."""
    backend, meta, _, k_cache, v_cache, _, _ = _setup(seqs, 16, torch.bfloat16)
    backend.__class__ = _RowsRecordingSDPA
    qkv, q, k, v, positions, cos_sin = _new_tokens(seqs, D // 2 if norm == "qk-norm-partial"
                                                   else D)
    gen = torch.Generator().manual_seed(11)
    norms = ((torch.randn(D, generator=gen), torch.randn(D, generator=gen), 1e-6)
             if norm != "none" else ())
    layer = AttentionLayer(layer_id=0, scale=0.1)
    before = qkv.clone()
    caches = (k_cache.clone(), v_cache.clone())
    out = backend.forward_prologue(q, k, v, k_cache, v_cache, layer, meta,
                                   AttentionPrologue(positions, cos_sin, True, *norms))
    assert out is not None and torch.equal(qkv, before)
    storages, addresses = zip(*backend.q_at)
    row_bytes = HQ * D * q.element_size()
    starts = [sum(n for _, n in seqs[:i]) for i in range(len(seqs))]
    assert len(set(storages)) == 1 and storages[0] != qkv.untyped_storage().data_ptr()
    assert [a - addresses[0] for a in addresses] == [s * row_bytes for s in starts]
    ops = before.clone()  # the layer's path: the op in place on the views, then forward
    q_view, k_view = ops[:, :HQ * D].view(q.shape), ops[:, HQ * D:(HQ + HK) * D].view(k.shape)
    if norms:
        q2, k2 = qk_norm_rotary(q_view, k_view, norms[0], norms[1], norms[2], positions,
                                cos_sin, True)
    else:
        q2, k2 = apply_rotary(positions, q_view, k_view, cos_sin, True)
    ref = backend.forward(q2, k2, v, *caches, layer, meta)
    assert torch.equal(out, ref)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])


@pytest.mark.parametrize("change", ["partial-rotary", "short", "knob-off"])
def test_extend_prologue_leaves_the_ops_to_the_layer(change: str) -> None:
    """None (the layer runs the ops) for a rotation over part of each head without norms,
    an extend below the dense path, or the knob off; the caches are not written."""
    seqs = ((0, 4),) if change == "short" else ((0, 40),)
    backend, meta, _, k_cache, v_cache, _, _ = _setup(seqs, 16, torch.bfloat16)
    backend.rotate_into_rows = change != "knob-off"
    _, q, k, v, positions, cos_sin = _new_tokens(seqs, D // 2 if change == "partial-rotary"
                                                 else D)
    caches = (k_cache.clone(), v_cache.clone())
    out = backend.forward_prologue(q, k, v, k_cache, v_cache, AttentionLayer(0, 0.1), meta,
                                   AttentionPrologue(positions, cos_sin, True))
    assert out is None
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
