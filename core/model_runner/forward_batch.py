"""The input of one forward step, produced by the scheduler and consumed by the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionMetadata


@dataclass
class PoolingInput:
    """Which final hidden-state rows a step pools: ``rows`` int64 ``[P]`` indices into the
    step's tokens, ``segments`` int64 ``[P]`` the pooled sequence (``0..num_pooled-1``, in
    sequence order) each row is summed into."""

    rows: torch.Tensor
    segments: torch.Tensor
    num_pooled: int


@dataclass
class ForwardBatch:
    """One step's tokens for a batch of sequences, all in one mode (extend or decode).

    ``input_ids`` int64 ``[T]`` and ``positions`` int64 ``[T]``: new tokens, grouped by
    sequence in ``attn.qo_indptr`` order; ``logits_indices`` int64 ``[R]``: the rows whose
    logits are computed, in sequence order: each sequence's last new token, or all of its new
    tokens when it asked for them (``SequenceInput.all_logits``; R == B otherwise). Every tensor is on the
    engine's device. ``pooling``: the rows embedding requests pool (None when no sequence
    of the step is an embedding request).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
    pooling: PoolingInput | None = None

    @property
    def batch_size(self) -> int:
        return self.attn.batch_size
