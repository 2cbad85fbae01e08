"""Qwen3: per-head RMSNorm on q and k before RoPE."""

from heteroserve.core.models.decoder import CausalLM, DecoderSpec


class Qwen3ForCausalLM(CausalLM):
    spec = DecoderSpec(qk_norm=True, use_sliding_window=True)
