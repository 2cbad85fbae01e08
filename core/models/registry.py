"""Hugging Face architecture names -> model classes."""

from __future__ import annotations

import importlib

from heteroserve.core.models.config import ModelLoadError

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek", "DeepseekV3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma", "Gemma3ForConditionalGeneration"),
}


def model_class(architecture: str) -> type:
    """The class for ``architecture``; :class:`ModelLoadError` lists the supported ones."""
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {architecture!r}; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    module, cls = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"heteroserve.core.models.{module}"), cls)
