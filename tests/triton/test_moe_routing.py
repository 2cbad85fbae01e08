"""The Triton grouped top-k (``moe_routing.py``) against the torch reference of the cpu
platform, over DeepSeek's routing shapes (interpreted on CPU, compiled on a GPU), and its
sm_90a build with PDL."""

from __future__ import annotations

import pytest
import torch
from ptx_check import hopper_ptx

from heteroserve.platforms.cpu import moe as reference
from heteroserve.platforms.triton.moe_routing import grouped_topk

# (tokens, experts, groups, topk_group, top_k, scoring, bias, renormalize, scale)
CASES = [
    (3, 64, 1, 1, 6, "softmax", False, False, 1.0),     # V2-Lite: one group (greedy)
    (4, 160, 8, 3, 6, "softmax", False, False, 16.0),   # V2: 8 groups of 20, 3 kept
    (5, 256, 8, 4, 8, "sigmoid", True, True, 2.5),      # V3 / R1: noaux_tc
    (2, 48, 6, 2, 5, "sigmoid", True, False, 1.0),      # ragged power-of-two padding
    (1, 8, 8, 4, 3, "sigmoid", True, True, 1.0),        # one expert a group
]


@pytest.mark.parametrize("t,e,g,tg,k,scoring,bias,renorm,scale", CASES)
def test_grouped_topk_matches_the_reference(device: torch.device, t: int, e: int, g: int,
                                            tg: int, k: int, scoring: str, bias: bool,
                                            renorm: bool, scale: float) -> None:
    gen = torch.Generator().manual_seed(e + t)
    # distinct logits with clear margins: a permutation of evenly spaced values
    logits = (torch.randperm(t * e, generator=gen).view(t, e).float() * (6.0 / (t * e)) - 3.0)
    corr = torch.rand(e, generator=gen) * 0.2 - 0.1 if bias else None
    args = (k, renorm, g, tg, scoring)
    ref_w, ref_ids = reference.grouped_topk(logits, *args, corr, scale)
    w, ids = grouped_topk(logits.to(device), *args,
                          None if corr is None else corr.to(device), scale)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == (t, k)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)


def test_grouped_topk_reads_bf16_logits_and_rejects_bad_groups(device: torch.device) -> None:
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    w, ids = grouped_topk(logits.to(device), 4, True, 4, 2)
    ref_w, ref_ids = reference.grouped_topk(logits, 4, True, 4, 2)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="equal groups"):
        grouped_topk(logits.to(device), 4, True, 5, 2)
    with pytest.raises(ValueError, match="scoring"):
        grouped_topk(logits.to(device), 4, True, 4, 2, "tanh")


@pytest.mark.parametrize("op,t,e,k,shared,extra", [
    ("topk_softmax", 3, 64, 6, 2, (False,)),                          # V2-Lite: 2 shared
    ("topk_softmax", 5, 16, 3, 3, (True,)),                           # odd slot count
    ("grouped_topk", 4, 160, 6, 2, (False, 8, 3, "softmax", None, 16.0)),  # V2: scaled
    ("grouped_topk", 2, 256, 8, 1, (True, 8, 4, "sigmoid", "bias", 2.5)),  # V3: 1 shared
])
def test_routing_appends_shared_expert_slots(device: torch.device, op: str, t: int, e: int,
                                             k: int, shared: int, extra: tuple) -> None:
    """Both Triton routing kernels with ``shared_experts``: the routed columns as without,
    then ids ``E ..`` at weight exactly 1.0 (neither renormalised nor scaled), as the cpu
    reference (``ops.append_shared_slots``)."""
    from heteroserve.core.kernels.ops import MOE_SHARED_SLOTS_ATTR
    from heteroserve.platforms.triton import moe as triton_moe

    gen = torch.Generator().manual_seed(e + t)
    logits = (torch.randperm(t * e, generator=gen).view(t, e).float() * (6.0 / (t * e)) - 3.0)
    if "bias" in extra:
        extra = tuple(torch.rand(e, generator=gen) * 0.2 - 0.1 if a == "bias" else a
                      for a in extra)
    fn = triton_moe.topk_softmax if op == "topk_softmax" else grouped_topk
    assert getattr(fn, MOE_SHARED_SLOTS_ATTR) is True
    ref_w, ref_ids = getattr(reference, op)(logits, k, *extra, shared_experts=shared)
    dev_extra = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in extra)
    w, ids = fn(logits.to(device), k, *dev_extra, shared_experts=shared)
    assert w.shape == ids.shape == (t, k + shared)
    assert torch.equal(ids.cpu(), ref_ids)
    assert torch.equal(ids[:, k:].cpu(), torch.arange(e, e + shared, dtype=torch.int32)
                       .expand(t, shared))
    assert torch.equal(w[:, k:].cpu(), torch.ones(t, shared))
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-6)
    _, unshared_ids = fn(logits.to(device), k, *dev_extra)
    assert torch.equal(unshared_ids.cpu(), ids[:, :k].cpu())
    with pytest.raises(ValueError, match="shared_experts"):
        fn(logits.to(device), k, *dev_extra, shared_experts=-1)


def test_grouped_topk_compiles_for_hopper_with_pdl() -> None:
    """The compiled kernel at DeepSeek-V3's shape builds for sm_90a and waits with
    ``griddepcontrol`` (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32",
           "stride_l": "i32", "num_experts": "i32", "scale": "fp32",
           **dict.fromkeys(["PER_GROUP", "GROUPS", "TOPK_GROUP", "TOP_K", "SIGMOID",
                            "HAS_BIAS", "RENORM", "BLOCK_E", "BLOCK_G", "BLOCK_K", "SHARED",
                            "BLOCK_S", "USE_PDL"],
                           "constexpr")}
    job = {"kernel": "_grouped_topk_kernel", "module": "heteroserve.platforms.triton.moe_routing",
           "signature": sig, "num_warps": 1, "aligned": [],
           "constexprs": {"PER_GROUP": 32, "GROUPS": 8, "TOPK_GROUP": 4, "TOP_K": 8,
                          "SIGMOID": True, "HAS_BIAS": True, "RENORM": True, "BLOCK_E": 256,
                          "BLOCK_G": 8, "BLOCK_K": 8, "SHARED": 1, "BLOCK_S": 1,
                          "USE_PDL": True}}
    (result,) = hopper_ptx([job])
    assert result["griddepcontrol_wait"], "the kernel waits for the router projection (PDL)"


def test_tiny_deepseek_v3_routed_by_the_triton_kernel_matches_transformers(
        device, tmp_path, monkeypatch) -> None:
    """The model's MoE blocks routed by the Triton grouped top-k (sigmoid, correction bias,
    groups, scaling; interpreted) give transformers' logits through prefill and decode."""
    if device.type != "cpu":
        pytest.skip("interpreter-only check; on a GPU the cuda platform resolves the kernel")
    import transformers
    from engine_harness import PagedSequence, cpu_args, decode, extend
    from triton_refs import rel_err

    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.models.tiny import build_tiny_model

    calls: list[int] = []

    def routed(*args, **kwargs):
        calls.append(1)
        return grouped_topk(*args, **kwargs)

    monkeypatch.setattr(reference, "grouped_topk", routed)  # resolved when the runner builds
    path = build_tiny_model(tmp_path / "dsv3", "deepseek_v3", seed=5)
    _, _, runner = build_model_runner(cpu_args(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [7, 31, 4, 99, 150, 2]
    seq = PagedSequence(runner, len(prompt) + 3)
    ours = extend(runner, [(prompt, 0, seq)])[0]
    ids = list(prompt)
    with torch.no_grad():
        assert rel_err(ours, hf(torch.tensor([ids])).logits[0, -1]) < 1e-4
        for _ in range(2):
            token = int(ours.argmax())
            ours = decode(runner, [(token, len(ids), seq)])[0]
            ids.append(token)
            assert rel_err(ours, hf(torch.tensor([ids])).logits[0, -1]) < 1e-4
    assert calls, "the Triton kernel routed the MoE blocks"
