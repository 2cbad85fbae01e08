"""DeepSeek batch-1 launch fusions: shared experts as extra experts of the fused MoE, and
q (or q_a) with kv_a as one projection. Each is chosen where it is exact and the model still
matches transformers; where it cannot apply (``--disable-shared-experts-fusion``, shared
experts quantized otherwise than the routed ones, routed experts dequantized at load,
``q_proj`` column-parallel, fp8 blocks that a merge would split) the separate path is chosen,
says why in the start-up block, and matches too."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine_harness import cpu_args
from heteroserve.core.layers.mla import MultiHeadLatentAttention
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.models.config import ModelLoadError
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from parity import assert_matches
from platform_under_test import TEST_PLATFORM
from quant_checkpoints import copy_without_weights, dequantized_reference, write_quantized


#: as tests/models/test_quantized_checkpoints.py on the cpu platform (where these tests land
#: within 1e-6: engine and reference quantize the same fp32 activations). On a GPU the
#: engine's fp32 reductions (norms, attention) differ from the CPU reference's in the last
#: bits, and an activation that sits on an fp8 rounding boundary rounds one step apart. On an
#: H100 (2026-12-06, docs/benchmarks/log.md; ``python tests/support/module_divergence.py cpu
#: cuda``) the first departure was layer 0's fp8 q_b_proj
#: with its input within 1e-4, and the logits ended 2.2e-2 / 2.5e-2 apart whichever kernels
#: ran (eight ops torch-native, no graph: the same); a wrong scale or block is off by O(1).
FP8_TOL = 2e-2 if TEST_PLATFORM == "cpu" else 5e-2


def _runner(path, **kw):
    return build_model_runner(cpu_args(path, **kw))[2]


def _hf(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def tiny(request, tmp_path_factory):
    return request.param, build_tiny_model(tmp_path_factory.mktemp(request.param),
                                           request.param, seed=4)


def test_fused_paths_are_chosen_and_match_transformers(tiny) -> None:
    arch, path = tiny
    runner = _runner(path)
    attn, moe = runner.model.model.layers[1].self_attn, runner.model.model.layers[1].mlp
    shared = 2 if arch == "deepseek_v2" else 1
    assert moe.fused_shared and moe.shared_experts is None
    assert moe.w13.shape[0] == 8 + shared and moe.shared_ids.tolist() == list(range(8, 8 + shared))
    assert attn.fused_qkv_a_proj_with_mqa is not None and attn.qkv_a_refusal is None
    assert not hasattr(attn, "kv_a_proj_with_mqa")
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert f"{shared} shared expert(s) fused into fused_moe" in block
    assert "appended by the routing op" in block
    assert "kv_a_proj_with_mqa as one projection" in block
    assert_matches(runner, _hf(path), 1e-4)


def test_routing_without_shared_slots_concatenates_them_and_matches(tiny, monkeypatch) -> None:
    """A routing implementation that does not declare ``appends_shared_experts`` (as the
    rocm and npu adapters) is called without ``shared_experts``; one concatenation appends
    the slots, and the routing and the model's logits are as with the op appending them."""
    arch, path = tiny
    runner = _runner(path)
    moe = runner.model.model.layers[1].mlp
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    in_op = moe.route(logits)
    assert moe.slots_in_op() and in_op[1].shape == (5, moe.top_k + moe.shared_ids.shape[0])
    op_name = "moe_topk_softmax" if moe._greedy() else "moe_grouped_topk"
    plain = getattr(runner.dispatch, op_name)
    seen: list[dict] = []

    def without_slots(*args, **kwargs):
        seen.append(kwargs)
        return plain(*args, **kwargs)

    monkeypatch.setattr(runner.dispatch, op_name, without_slots)
    assert not moe.slots_in_op()
    concatenated = moe.route(logits)
    assert seen == [{}], "the op is not asked for slots it does not declare"
    assert torch.equal(concatenated[1], in_op[1]) and torch.equal(concatenated[0], in_op[0])
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "appended by one concatenation" in block
    assert_matches(runner, _hf(path), 1e-4)


def test_disabled_fusion_runs_the_separate_mlp_and_matches(tiny) -> None:
    arch, path = tiny
    runner = _runner(path, disable_shared_experts_fusion=True)
    moe = runner.model.model.layers[2].mlp
    assert not moe.fused_shared and moe.shared_experts is not None and moe.w13.shape[0] == 8
    assert moe.shared_path.reason == "--disable-shared-experts-fusion"
    assert_matches(runner, _hf(path), 1e-4)


def test_column_parallel_q_proj_stays_separate(tiny) -> None:
    """At tp > 1 V2's ``q_proj`` is split by heads and kv_a is not: no merge. V3's q_a and
    kv_a are both replicated and merge at any tp (tp 2 end to end: tests/tp)."""
    arch, path = tiny
    runner = _runner(path)
    attn = runner.model.model.layers[0].self_attn
    ctx = dataclasses.replace(runner.model.ctx, tp_size=2)
    two = MultiHeadLatentAttention(ctx, attn.dims, 1e-6, 0, 1.0, attn.rotary_emb)
    if arch == "deepseek_v2":
        assert two.qkv_a_refusal == "q_proj is column-parallel (tp 2)"
        assert two.fused_qkv_a_proj_with_mqa is None and two.q_proj.weight.shape[0] == 2 * 48
    else:
        assert two.qkv_a_refusal is None and two.fused_qkv_a_proj_with_mqa is not None


def test_missing_shared_expert_tensor_is_named(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "v2", "deepseek_v2", seed=4)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.2.mlp.shared_experts.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp\.shared_experts\."
                                             "down_proj"):
        _runner(path)


@pytest.fixture(scope="module")
def fp8_v3(tmp_path_factory):
    """A V3 fp8-block checkpoint whose experts stay fp8 (I = 128) and whose q_a rows (128)
    end on a block, so q_a + kv_a (80 rows: a partial last block) merge too."""
    tmp = tmp_path_factory.mktemp("fp8")
    v3 = build_tiny_model(tmp / "v3", "deepseek_v3", seed=3, moe_intermediate_size=128,
                          q_lora_rank=128)
    path, scheme, group = write_quantized(v3, tmp / "ckpt", "fp8-block")
    return v3, path, tmp


def test_fp8_block_shared_experts_and_q_a_kv_a_fuse(fp8_v3, tmp_path) -> None:
    """The shared experts' fp8 weights and ``weight_scale_inv`` land in the extra slots
    (weight-only, as the routed experts: their inputs stay unquantized in the reference);
    the merged q_a/kv_a projection keeps each part's blocks. Separate (disabled), the shared
    MLP quantizes its input as before. (Tolerance: an activation rounded to fp8 a step
    apart by fp32 summation order moves logits by about 1e-2.)"""
    _, path, _ = fp8_v3
    runner = _runner(path)
    attn, moe = runner.model.model.layers[1].self_attn, runner.model.model.layers[1].mlp
    assert moe.fused_shared and moe.storage.kept and moe.w13.dtype == torch.float8_e4m3fn
    merged = attn.fused_qkv_a_proj_with_mqa
    assert merged is not None and merged.quant.scheme == "fp8_block"
    assert merged.weight_scale_inv.shape == (2, 1)  # 128 + 80 rows: 1 + 1 block rows
    hf = dequantized_reference(path, "fp8_block", 32, tmp_path / "fused",
                               skip=("kv_b_proj", "shared_experts"))
    assert_matches(runner, hf, FP8_TOL)
    runner = _runner(path, disable_shared_experts_fusion=True)
    assert runner.model.model.layers[1].mlp.shared_experts.gate_up_proj.quant.scheme == \
        "fp8_block"
    hf = dequantized_reference(path, "fp8_block", 32, tmp_path / "separate", skip=("kv_b_proj",))
    assert_matches(runner, hf, FP8_TOL)


def test_unquantized_shared_experts_next_to_fp8_routed_ones_stay_separate(fp8_v3,
                                                                          tmp_path) -> None:
    """Shared experts the checkpoint keeps unquantized (``ignored_layers``) cannot fill
    fp8 expert slots: they run as the separate MLP, unquantized."""
    v3, src, _ = fp8_v3
    path = copy_without_weights(src, tmp_path / "ckpt")
    tensors = load_file(str(src / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if ".shared_experts." not in k}
    tensors.update({k: v for k, v in load_file(str(v3 / "model.safetensors")).items()
                    if ".shared_experts." in k})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["ignored_layers"] = ["shared_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    runner = _runner(path)
    moe = runner.model.model.layers[1].mlp
    assert not moe.fused_shared and moe.w13.shape[0] == 8
    assert moe.shared_path.reason.startswith("shared_experts.gate_proj is stored as")
    assert moe.shared_experts.gate_up_proj.quant.scheme == "unquantized"
    hf = dequantized_reference(path, "fp8_block", 32, tmp_path,
                               skip=("kv_b_proj", "shared_experts"))
    assert_matches(runner, hf, FP8_TOL)


def test_dequantized_routed_experts_keep_the_shared_mlp_separate(fp8_v3, tmp_path,
                                                                 monkeypatch) -> None:
    """A ``fused_moe`` that runs no fp8 experts gets them dequantized at load; the shared
    MLP then keeps its fp8 kernels (W8A8: its input quantized, as the reference does)."""
    if TEST_PLATFORM != "cpu":
        pytest.skip("swaps the cpu platform's fused_moe for one without fp8 experts")
    from heteroserve.platforms.cpu import moe as cpu_moe

    original = cpu_moe.fused_moe
    monkeypatch.setattr(cpu_moe, "fused_moe", lambda x, w13, w2, tw, ids:
                        original(x, w13, w2, tw, ids))
    _, path, _ = fp8_v3
    runner = _runner(path)
    moe = runner.model.model.layers[1].mlp
    assert not moe.storage.kept and not moe.fused_shared and moe.w13.shape[0] == 8
    assert "dequantized at load" in moe.shared_path.reason
    hf = dequantized_reference(path, "fp8_block", 32, tmp_path, skip=("kv_b_proj",))
    assert_matches(runner, hf, FP8_TOL)
