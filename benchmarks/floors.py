"""Physical floors of the headline workloads, computed from a model's config.json (dense
Llama-style and Qwen3-MoE-style configs) and the device ceilings measured in the same run
(``ceilings = {"copy_bandwidth_Bps", "matmul_flops"}``, see roofline.py).

Parameter counts are of the linear weights (norms, < 0.01 %, are left out). A token reads or
multiplies: per layer the attention projections (q, k, v, o), for an MoE layer the router and
``num_experts_per_tok`` of ``num_experts`` experts (gate, up, down of ``moe_intermediate_size``),
for a dense layer the MLP (gate, up, down of ``intermediate_size``); then the LM head, and one
row of the embedding matrix. Qwen3-30B-A3B: 3.04 B active parameters of 30.5 B.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    """Linear-weight parameter counts of one model (numbers of elements, not bytes)."""

    attention: int      # q, k, v, o of every layer
    router: int         # every MoE layer's gate
    dense_mlp: int      # every dense layer's MLP
    expert: int         # one expert of one layer (gate + up + down)
    moe_layers: int
    num_experts: int
    top_k: int
    lm_head: int
    embedding_row: int

    @property
    def active(self) -> int:
        """Parameters one token reads: batch-1 decode's weight traffic."""
        return (self.attention + self.router + self.dense_mlp
                + self.moe_layers * self.top_k * self.expert + self.lm_head + self.embedding_row)

    @property
    def per_token_linear(self) -> int:
        """Parameters one token multiplies in the layers (LM head and embedding left out)."""
        experts = self.moe_layers * self.top_k * self.expert
        return self.attention + self.router + self.dense_mlp + experts

    @property
    def all_experts(self) -> int:
        return self.moe_layers * self.num_experts * self.expert

    @property
    def non_expert(self) -> int:
        """Weights every decode step reads whatever the routing (embedding: one row per token,
        left out)."""
        return self.attention + self.router + self.dense_mlp + self.lm_head


def param_counts(cfg: dict) -> ParamCounts:
    """Counts for a Llama- or Qwen3-MoE-style config (no expert count: dense)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    attention = layers * (h * (heads + 2 * kv_heads) * hd + heads * hd * h)
    # ``num_local_experts``: the name transformers 5 writes (and Mixtral's)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    step = cfg.get("decoder_sparse_step") or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    moe = [i for i in range(layers)
           if experts and i not in dense_only and (i + 1) % step == 0]
    dense_mlp = (layers - len(moe)) * 3 * h * cfg["intermediate_size"]
    expert = 3 * h * cfg["moe_intermediate_size"] if moe else 0
    return ParamCounts(attention=attention, router=len(moe) * h * experts, dense_mlp=dense_mlp,
                       expert=expert, moe_layers=len(moe), num_experts=experts,
                       top_k=cfg.get("num_experts_per_tok") or 0,
                       lm_head=h * cfg["vocab_size"], embedding_row=h)


def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * hd * dtype_bytes


def causal_attention_flops(cfg: dict, length: int, prefix: int = 0) -> float:
    """QK^T and PV FLOPs of ``length`` new tokens attending causally to ``prefix`` cached ones
    plus each other: ``layers * 2 (QK, PV) * 2 * heads * head_dim * sum of context lengths``."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    contexts = length * prefix + length * (length + 1) / 2
    return cfg["num_hidden_layers"] * 2 * 2 * cfg["num_attention_heads"] * hd * contexts


def decode1_roofline(cfg: dict, ceilings: dict, dtype_bytes: int) -> dict:
    """Batch-1 decode tok/s if every active weight byte is read once per token at the copy
    bandwidth (KV left out: 128-token prompts)."""
    counts = param_counts(cfg)
    weight_bytes = counts.active * dtype_bytes
    return {"active_params": counts.active, "active_weight_bytes": weight_bytes,
            "roofline_tok_per_s": ceilings["copy_bandwidth_Bps"] / weight_bytes}


def prefill_floor(cfg: dict, length: int, ceilings: dict) -> dict:
    """Time to first token of one ``length``-token prompt if it ran at the measured matmul
    rate: linear FLOPs (``2 * per_token_linear * length``, plus the LM head for one row)
    + causal attention FLOPs."""
    counts = param_counts(cfg)
    linear = 2.0 * counts.per_token_linear * length + 2.0 * counts.lm_head
    attention = causal_attention_flops(cfg, length)
    flops = linear + attention
    return {"linear_flops": linear, "attention_flops": attention, "flops": flops,
            "floor_s": flops / ceilings["matmul_flops"]}


def experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected number of distinct experts a batch of ``batch`` tokens routes to when each
    picks ``top_k`` of ``num_experts`` uniformly: ``E * (1 - (1 - k/E)^B)`` (all 128 at batch
    256 with top-8 of 128)."""
    if not num_experts:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def moe_offline_floor(cfg: dict, n: int, inp: int, out: int, ceilings: dict,
                      max_running: int, dtype_bytes: int) -> dict:
    """Floor of ``n`` prompts of ``inp`` tokens generating ``out`` tokens each, at most
    ``max_running`` at once, on an MoE model::

        floor_s = FLOPs / matmul_flops + (weight_read + kv_read) / copy_bandwidth
        FLOPs       = 2 * per_token_linear * n * (inp + out)      # active linear weights
                    + 2 * lm_head * n * out                       # one logits row per new token
                    + causal attention FLOPs of every prompt and every decode step
        weight_read = decode_steps * (non_expert + moe_layers * touched * expert) * dtype_bytes
                      decode_steps = out * ceil(n / max_running);
                      touched = experts_touched(E, k, min(n, max_running))
        kv_read     = n * kv_bytes_per_token * sum_{i < out} (inp + i)

    Prefill weight reads are left out (prefill is FLOP-bound); so is the overlap of compute
    with memory traffic (a floor adds them, as bench_llama8b's ``workload_floor`` does).
    """
    counts = param_counts(cfg)
    tokens = n * (inp + out)
    linear = 2.0 * counts.per_token_linear * tokens + 2.0 * counts.lm_head * n * out
    attention = n * (causal_attention_flops(cfg, inp)
                     + sum(causal_attention_flops(cfg, 1, inp + i) for i in range(out)))
    concurrent = min(n, max_running)
    decode_steps = out * -(-n // concurrent)
    touched = experts_touched(counts.num_experts, counts.top_k, concurrent)
    per_step = counts.non_expert + counts.moe_layers * touched * counts.expert
    weight_read = decode_steps * per_step * dtype_bytes
    kv_read = n * kv_bytes_per_token(cfg, dtype_bytes) * sum(inp + i for i in range(out))
    t_flops = (linear + attention) / ceilings["matmul_flops"]
    t_bytes = (weight_read + kv_read) / ceilings["copy_bandwidth_Bps"]
    return {"flops": linear + attention, "linear_flops": linear, "attention_flops": attention,
            "experts_touched_per_layer": touched, "decode_steps": decode_steps,
            "weight_read_bytes": weight_read, "kv_read_bytes": kv_read,
            "flop_time_s": t_flops, "byte_time_s": t_bytes, "floor_s": t_flops + t_bytes,
            "floor_total_tok_per_s": tokens / (t_flops + t_bytes)}
