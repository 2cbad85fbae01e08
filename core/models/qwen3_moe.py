"""Qwen3-MoE: Qwen3 attention (q/k norm) with a routed MoE in ``mlp``
(``norm_topk_prob`` decides renormalisation)."""

from heteroserve.core.models.decoder import CausalLM, DecoderSpec


class Qwen3MoeForCausalLM(CausalLM):
    spec = DecoderSpec(qk_norm=True, moe_module="mlp", use_sliding_window=True)
