"""Loading: sharded checkpoints, dummy weights, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_harness import PagedSequence, cpu_args, extend
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.config import ModelConfig, ModelLoadError
from heteroserve.core.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=2)


def _logits(path, **kw):
    _, _, runner = build_model_runner(cpu_args(path, **kw))
    return extend(runner, [([5, 6, 7, 8], 0, PagedSequence(runner, 4))])[0]


def test_sharded_checkpoint_loads_equal(tmp_path) -> None:
    single = build_tiny_model(tmp_path / "single", "mixtral", seed=3)
    sharded = build_tiny_model(tmp_path / "sharded", "mixtral", seed=3, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(single), _logits(sharded))


def test_dummy_weights_need_only_config(llama, tmp_path) -> None:
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    shutil.copy(llama / "config.json", only_config / "config.json")
    logits = _logits(only_config, load_format="dummy")
    assert logits.shape == (512,) and torch.isfinite(logits).all()
    assert torch.equal(logits, _logits(only_config, load_format="dummy"))


def test_errors_are_clear(llama, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_model_runner(cpu_args(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="supported: .*LlamaForCausalLM"):
        build_model_runner(cpu_args(bad))
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(llama / "config.json", empty / "config.json")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        build_model_runner(cpu_args(empty))


def test_config_reads_both_spellings(tmp_path) -> None:
    old = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "vocab_size": 10, "torch_dtype": "float16",
           "rope_theta": 1234.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {**{k: v for k, v in old.items() if k not in ("torch_dtype", "rope_theta", "rope_scaling")},
           "dtype": "float16",
           "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}}
    a = ModelConfig.from_dict(old, tmp_path)
    b = ModelConfig.from_dict(new, tmp_path)
    assert (a.dtype, a.rope_theta, a.rope_scaling) == (b.dtype, b.rope_theta, b.rope_scaling)
    assert a.dtype == torch.float16 and a.rope_theta == 1234.0
    assert a.rope_scaling["rope_type"] == "linear" and a.head_dim == 32


def test_text_config_of_a_multimodal_checkpoint_gets_transformers_defaults(tmp_path) -> None:
    """Gemma 3 12B's config.json lists only non-default text keys; the rest come from
    transformers' Gemma3TextConfig."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16",
           "text_config": {"model_type": "gemma3_text", "hidden_size": 3840,
                           "intermediate_size": 15360, "num_attention_heads": 16,
                           "num_hidden_layers": 48, "num_key_value_heads": 8,
                           "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024}}
    cfg = ModelConfig.from_dict(raw, tmp_path)
    assert cfg.architecture == "Gemma3ForConditionalGeneration"
    assert (cfg.head_dim, cfg.vocab_size, cfg.sliding_window) == (256, 262208, 1024)
    assert cfg.dtype == torch.bfloat16 and cfg.raw["query_pre_attn_scalar"] == 256


def test_deepseek_router_stays_fp32_in_a_bf16_model(tmp_path) -> None:
    path = build_tiny_model(tmp_path, "deepseek_v3", seed=1)
    args = cpu_args(path)
    args.dtype = "bfloat16"
    _, _, runner = build_model_runner(args)
    moe = runner.model.model.layers[1].mlp
    assert moe.gate.weight.dtype == torch.float32 and moe.w13.dtype == torch.bfloat16
    assert torch.isfinite(extend(runner, [([5, 6, 7], 0, PagedSequence(runner, 3))])[0]).all()
