"""Qwen2: Llama with biases on q, k and v (sliding window when ``use_sliding_window``)."""

from heteroserve.core.models.decoder import CausalLM, DecoderSpec


class Qwen2ForCausalLM(CausalLM):
    spec = DecoderSpec(qkv_bias=True, use_sliding_window=True)
