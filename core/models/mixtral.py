"""Mixtral: Mistral attention with a top-2 softmax-routed MoE (``block_sparse_moe``)."""

from heteroserve.core.models.decoder import CausalLM, DecoderSpec


class MixtralForCausalLM(CausalLM):
    spec = DecoderSpec(moe_module="block_sparse_moe", use_sliding_window=True)
