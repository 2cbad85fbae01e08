"""Read a Hugging Face ``config.json`` into the facts the engine needs, whichever spelling
the transformers version that wrote it used."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(ValueError):
    """A model folder cannot be used: missing files or tensors, or an unsupported architecture."""


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "float": torch.float32}


@dataclass
class ModelConfig:
    """Normalised model facts. ``rope_scaling`` is None for plain RoPE, else a dict with a
    ``rope_type`` key; ``sliding_window`` is None unless the model really uses one;
    ``attn_logit_softcap`` is Gemma 2's attention score cap (None: no cap)."""

    path: Path
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position: int
    context_len: int
    tie_word_embeddings: bool
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: list[int]
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    attn_logit_softcap: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, path: str | Path, dtype: str = "auto",
                    context_length: int | None = None) -> ModelConfig:
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist")
        if not cfg_file.is_file():
            raise ModelLoadError(f"{folder} has no config.json (a Hugging Face model folder is needed)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, folder, dtype, context_length)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], folder: Path, dtype: str = "auto",
                  context_length: int | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ModelLoadError(f"{folder}/config.json names no architectures")
        if isinstance(raw.get("text_config"), dict):
            raw = _text_model(raw, archs)
        heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        theta, scaling = _rope(raw)
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False or not isinstance(window, int):
            window = None
        max_pos = int(raw.get("max_position_embeddings", 4096))
        eos = raw.get("eos_token_id")
        return cls(
            path=folder, architecture=archs[0], hidden_size=hidden,
            num_layers=raw["num_hidden_layers"], num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            intermediate_size=raw.get("intermediate_size", 0), vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_position=max_pos, context_len=context_length or max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=window, dtype=_dtype(raw, dtype),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            num_experts=raw.get("num_local_experts") or raw.get("num_experts") or 0,
            top_k=raw.get("num_experts_per_tok", 0),
            moe_intermediate_size=raw.get("moe_intermediate_size") or raw.get("intermediate_size", 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            attn_logit_softcap=raw.get("attn_logit_softcapping"), raw=raw)


def _text_model(raw: dict[str, Any], archs: list[str]) -> dict[str, Any]:
    """A multimodal checkpoint served as its text model (e.g. Gemma 3 4B+): its
    ``text_config`` completed with the defaults of transformers' config class for that
    ``model_type`` (checkpoints omit keys at their default), under the top-level
    architecture, dtype and embedding tying."""
    from transformers import CONFIG_MAPPING

    text = raw["text_config"]
    kind = text.get("model_type")
    if kind not in CONFIG_MAPPING:
        raise ModelLoadError(f"text_config.model_type {kind!r} is not a transformers config")
    full = CONFIG_MAPPING[kind](**text).to_dict()
    for key in ("torch_dtype", "dtype", "tie_word_embeddings", "eos_token_id"):
        if raw.get(key) is not None:
            full[key] = raw[key]
    full["architectures"] = archs
    return full


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return theta, scaling


def _dtype(raw: dict[str, Any], requested: str) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.bfloat16)
