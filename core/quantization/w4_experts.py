"""AWQ, GPTQ and compressed-tensors W4A16 expert projections brought to the ``w4a16`` layout
of the fused MoE contract (:class:`~heteroserve.core.kernels.ops.MoEWeightQuant`): eight
consecutive input features of one output row per int32 word, fp32 group scales and int8
zero points per output row. Torch ops, once per expert projection at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER
from heteroserve.core.quantization import nibbles

#: the linear schemes whose experts can be held as ``w4a16`` experts
W4_EXPERT_SCHEMES: tuple[str, ...] = ("awq_w4a16", "gptq_w4a16")


@dataclass(frozen=True)
class W4Rows:
    """One expert projection ``W [N, K]`` by output row: ``q`` uint8 ``[N, K]`` (0..15),
    ``zero`` int8 and ``scale`` fp32 ``[N, K // G]``; ``W[n, k] = (q[n, k] - zero[n, k //
    G]) * scale[n, k // G]``."""

    q: torch.Tensor
    zero: torch.Tensor
    scale: torch.Tensor

    def rows(self, sl: slice) -> W4Rows:
        """Output rows ``sl`` (a column-parallel shard)."""
        return W4Rows(self.q[sl], self.zero[sl], self.scale[sl])

    def columns(self, first: int, count: int, group: int) -> W4Rows:
        """Input features ``[first, first + count)``, both multiples of ``group`` (a
        row-parallel shard)."""
        g = slice(first // group, (first + count) // group)
        return W4Rows(self.q[:, first:first + count], self.zero[:, g], self.scale[:, g])

    def words(self) -> torch.Tensor:
        """``q`` packed: int32 ``[N, K // 8]``, feature ``8w + j`` in bits ``4j..4j+3``."""
        return nibbles.pack(self.q, 1)


def w4_rows(scheme: str, parts: dict[str, torch.Tensor]) -> W4Rows:
    """The rows of a checkpoint's AWQ (``qweight [K, N/8]`` packed in AWQ's order,
    ``qzeros [K/G, N/8]``, ``scales [K/G, N]``) or GPTQ v1 (``qweight [K/8, N]``, ``qzeros
    [K/G, N/8]`` holding zero - 1, ``scales [K/G, N]``) projection, without act-order
    (a ``g_idx`` part, if any, is the trivial ``k // G`` and is not read). Raises
    ``ValueError`` for another scheme."""
    if scheme == "awq_w4a16":
        q = nibbles.unpack(parts["qweight"], 1, AWQ_ORDER)
        zero = nibbles.unpack(parts["qzeros"], 1, AWQ_ORDER).to(torch.int8)
    elif scheme == "gptq_w4a16":
        q = nibbles.unpack(parts["qweight"], 0)
        zero = (nibbles.unpack(parts["qzeros"], 1).to(torch.int16) + 1).to(torch.int8)
    else:
        raise ValueError(f"{scheme} experts have no w4a16 layout")
    return W4Rows(q.t().contiguous(), zero.t().contiguous(),
                  parts["scales"].to(torch.float32).t().contiguous())
