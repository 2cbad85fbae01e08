"""Llama 2/3/3.1 (incl. llama3 RoPE scaling) and Mistral (sliding window)."""

from heteroserve.core.models.decoder import CausalLM, DecoderSpec


class LlamaForCausalLM(CausalLM):
    spec = DecoderSpec()


class MistralForCausalLM(CausalLM):
    spec = DecoderSpec(use_sliding_window=True)
