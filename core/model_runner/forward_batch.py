"""The input of one forward step, produced by the scheduler and consumed by the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionMetadata


@dataclass
class ForwardBatch:
    """One step's tokens for a batch of sequences, all in one mode (extend or decode).

    ``input_ids`` int64 ``[T]`` and ``positions`` int64 ``[T]``: new tokens, grouped by
    sequence in ``attn.qo_indptr`` order; ``logits_indices`` int64 ``[R]``: the rows whose
    logits are computed, in sequence order: each sequence's last new token, or all of its new
    tokens when it asked for them (``SequenceInput.all_logits``; R == B otherwise). Every tensor is on the
    engine's device.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.attn.batch_size
