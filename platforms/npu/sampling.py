"""Sampling on Ascend: top-k or top-p filtering with ``torch_npu.npu_top_k_top_p``, the draw by
the torch-native sampler (so a request draws the same tokens on NPU and on CPU whenever the
filtered distributions agree).

``torch_npu.npu_top_k_top_p(logits [B, V], p=[B] same dtype as logits, k=int32 [B])`` sorts
each row ascending, sets everything below the k-th largest value to -inf, softmaxes what is
left and drops entries whose ascending cumulative probability is <= 1 - p (the largest entry
always kept). Two differences from heteroserve's sampling contract decide which rows use it:

- its top-p runs on the distribution renormalised after top-k (sequential filters, as vLLM
  does), while the contract intersects top-k and top-p over the same distribution, so rows
  with both filters active go to the torch-native path;
- ``k`` must lie in [1, 1024], so a row with only top-p uses the operator (``k = V``) only when
  ``V <= 1024``, and a row with ``top_k > 1024`` never does.

Rows the operator filtered reach the torch-native sampler with their filters switched off;
other rows keep theirs. No host synchronisation decides the split. (At exact ties on the k-th
value the operator keeps every tied token; the contract keeps the lower ids.)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.platforms.npu.platform import _torch_npu

NPU_TOP_K_MAX = 1024
_npu = _torch_npu()


def sample(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """:class:`~heteroserve.core.kernels.ops.SamplingOp` (see the module docstring)."""
    from heteroserve.platforms.cpu.sampling import sample as torch_native_sample

    if params.all_greedy:
        return torch_native_sample(logits, params)
    vocab = logits.shape[-1]
    greedy = params.temperatures <= 0
    temps = torch.where(greedy, torch.ones_like(params.temperatures), params.temperatures)
    scaled = logits / temps[:, None].to(logits.dtype)
    k_max = min(vocab, NPU_TOP_K_MAX)
    top_k_on = params.top_ks > 0
    top_p_on = params.top_ps < 1
    k = torch.where(top_k_on, params.top_ks.clamp(max=k_max), torch.full_like(params.top_ks, k_max))
    p = torch.where(top_k_on, torch.ones_like(params.top_ps), params.top_ps)
    filtered = _npu.npu_top_k_top_p(scaled, p=p.to(scaled.dtype), k=k.to(torch.int32))
    by_op = top_k_on & (params.top_ks <= NPU_TOP_K_MAX) & ~top_p_on
    if vocab <= NPU_TOP_K_MAX:
        by_op |= ~top_k_on & top_p_on
    filtered = torch.where(by_op[:, None], filtered, scaled)
    rest = replace(
        params,
        temperatures=torch.where(greedy, params.temperatures, torch.ones_like(temps)),
        top_ks=torch.where(by_op, torch.zeros_like(params.top_ks), params.top_ks),
        top_ps=torch.where(by_op, torch.ones_like(params.top_ps), params.top_ps),
    )
    return torch_native_sample(filtered, rest)
