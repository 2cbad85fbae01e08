"""Build small random-weight models on disk, with a locally trained tokenizer.

No download is ever needed: the config comes from transformers' config classes, the weights
from transformers' own random initialisation (saved as safetensors), and the tokenizer is a
byte-level BPE trained here on a built-in corpus. Tests use these models to compare against
transformers, and ``heteroserve serve`` with no ``--model-path`` serves the default one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2", "gemma3",
                 "deepseek_v2", "deepseek_v3")
DEFAULT_MODEL_NAME = "heteroserve-tiny-llama"

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Gemma's turn format: ``user``/``model`` turns; a leading system message joins the first
#: user turn (Gemma has no system role).
_GEMMA_CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if loop.first %}{{ system }}{% endif %}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
#: DeepSeek's turn format: system text first, then ``<｜User｜>`` / ``<｜Assistant｜>`` turns,
#: an assistant turn closed by the end-of-sentence token.
_DEEPSEEK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% else %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
_CHAT_TEMPLATES = {"chatml": _CHAT_TEMPLATE, "gemma": _GEMMA_CHAT_TEMPLATE,
                   "deepseek": _DEEPSEEK_CHAT_TEMPLATE}
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                   "<start_of_turn>", "<end_of_turn>", "<｜User｜>", "<｜Assistant｜>",
                   "<｜end▁of▁sentence｜>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A serving engine schedules requests, batches
them continuously, caches shared prefixes in a radix tree and streams tokens back to clients.
Large language models predict the next token. Attention reads keys and values from a paged
cache. {"name": "Ada", "age": 36, "tags": ["math", "engines"], "active": true, "score": 9.5}
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
One two three four five six seven eight nine ten. 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.
def main():\n    print("hello")\n    return 0\n
The sun rises in the east and sets in the west. Water boils at one hundred degrees.
Numbers, letters, punctuation: ; : , . ! ? ( ) [ ] { } < > = + - * / % & | ^ ~ @ # $ "
"""


def _tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=0, pad_token_id=None,
        tie_word_embeddings=False, dtype="float32",
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=96, norm_topk_prob=True)
    elif arch == "gemma2":
        # every option that differs from Llama: softcaps small enough to bite, a window
        # shorter than the test prompts, query_pre_attn_scalar != head_dim
        cfg = tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, sliding_window=8,
                              attn_logit_softcapping=10.0, final_logit_softcapping=5.0,
                              query_pre_attn_scalar=48, hidden_activation="gelu_pytorch_tanh")
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{**common, "tie_word_embeddings": True, "num_hidden_layers": 3},
            sliding_window=8, query_pre_attn_scalar=48,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                   "rope_theta": 1000000.0}})
    elif arch in ("deepseek_v2", "deepseek_v3"):
        mla = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
        mla.update(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=64,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
                   n_routed_experts=8, moe_intermediate_size=48, n_group=4, topk_group=2,
                   first_k_dense_replace=1)
        if arch == "deepseek_v2":  # no q LoRA, softmax group-limited routing, 2 shared experts
            cfg = tf.DeepseekV2Config(
                **mla, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3,
                topk_method="group_limited_greedy", routed_scaling_factor=2.0,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 512, "mscale": 1.0,
                                 "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1})
        else:  # q LoRA, sigmoid routing with correction bias (noaux_tc), renormalised
            cfg = tf.DeepseekV3Config(
                **mla, q_lora_rank=96, n_shared_experts=1, num_experts_per_tok=2,
                routed_scaling_factor=2.5, norm_topk_prob=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 512, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 512,
                    chat_format: str = "chatml") -> Any:
    """Train a byte-level BPE tokenizer on the built-in corpus and save it to ``out_dir``.

    Any text round-trips through it (bytes are the base alphabet). Token 0 is
    ``<|endoftext|>``, the EOS token; the chat template is ChatML, or Gemma's or DeepSeek's
    turn format with ``chat_format="gemma"`` / ``"deepseek"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=_SPECIAL_TOKENS[1:])
    fast.chat_template = _CHAT_TEMPLATES[chat_format]
    fast.save_pretrained(str(out_dir))
    return fast


def _chat_format(arch: str) -> str:
    return next((f for f in ("gemma", "deepseek") if arch.startswith(f)), "chatml")


def build_tiny_model(out_dir: str | os.PathLike[str], arch: str = "llama", seed: int = 0,
                     vocab_size: int = 512, max_shard_size: str | None = None,
                     **config_overrides: Any) -> Path:
    """Write a random-weight ``arch`` model (fp32 safetensors), its config and a tokenizer to
    ``out_dir`` and return the path. Deterministic for a given ``seed``.

    ``max_shard_size`` (e.g. ``"200KB"``) forces a sharded checkpoint with an index file.
    ``config_overrides`` set config attributes (e.g. ``num_hidden_layers=3``).
    """
    import torch
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=vocab_size, chat_format=_chat_format(arch))
    cfg = _tiny_config(arch, vocab_size=max(vocab_size, len(tokenizer)), **config_overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # widen the tiny init so logits are not all near-equal
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif arch.startswith("gemma"):  # norms store w of (1 + w); HF initialises w = 0
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero in HF's init: make it matter
                b.normal_(0.0, 0.1)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()
    return out


def default_model_dir() -> Path:
    """Where the default served model lives: ``$HETEROSERVE_HOME`` or ``~/.cache/heteroserve``."""
    home = Path(os.environ.get("HETEROSERVE_HOME", Path.home() / ".cache" / "heteroserve"))
    return home / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Build the default tiny Llama once (a few seconds) and return its folder."""
    path = default_model_dir()
    if not (path / "config.json").exists():
        logger.info("building the default model %s at %s (random weights, no download)",
                    DEFAULT_MODEL_NAME, path)
        build_tiny_model(path, "llama", seed=0, vocab_size=1024, hidden_size=256,
                         intermediate_size=512, num_hidden_layers=4)
        (path / "heteroserve.json").write_text(json.dumps({"built_by": "heteroserve", "seed": 0}))
    return path
