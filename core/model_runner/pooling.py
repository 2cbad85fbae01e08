"""Embedding requests: pool a prompt's final hidden states into one vector.

An embedding request is prefill-only (``max_new_tokens == 0``). The model runner returns,
for each sequence that asks, the fp32 *sum* of the final-norm hidden states of the rows it
selects in one step (:class:`PoolingType.LAST`: the prompt's last token, selected only in the
step that reaches it; :class:`PoolingType.MEAN`: every new token of every chunk). A
:class:`PoolAccumulator` adds these partial sums over chunked-prefill steps and produces the
embedding when the prompt is complete.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class PoolingType(str, enum.Enum):
    """How a prompt's final hidden states become one vector."""

    LAST = "last"  # the last prompt token's hidden state (causal LMs see the whole prompt there)
    MEAN = "mean"  # the average over every prompt token


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedding request asks for: the pooling and whether the result is scaled to
    unit L2 norm."""

    pooling: PoolingType = PoolingType.LAST
    normalize: bool = True

    @classmethod
    def of(cls, pooling: str | PoolingType, normalize: bool = True) -> EmbedSpec:
        """From a pooling name (``last`` | ``mean``); ``ValueError`` for any other value."""
        try:
            kind = PoolingType(pooling)
        except ValueError:
            raise ValueError(f"pooling must be one of {[p.value for p in PoolingType]}, "
                             f"got {pooling!r}") from None
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {normalize!r}")
        return cls(kind, normalize)

    @property
    def reuses_prefix(self) -> bool:
        """Whether cached KV may stand in for prompt tokens: last-token pooling needs only
        the last token's hidden state (always computed), mean pooling needs every token's."""
        return self.pooling is PoolingType.LAST


class PoolAccumulator:
    """Partial sums of one request's pooled rows across steps (see the module docstring).

    :meth:`add` takes an fp32 ``[H]`` sum of ``num_rows`` hidden-state rows;
    :meth:`result` returns the embedding as a list of ``H`` floats; :meth:`reset` forgets
    everything (the request's KV was released and it will be prefilled again).
    """

    def __init__(self, spec: EmbedSpec) -> None:
        self.spec = spec
        self._sum: torch.Tensor | None = None
        self._rows = 0

    def reset(self) -> None:
        self._sum, self._rows = None, 0

    def add(self, row_sum: torch.Tensor, num_rows: int) -> None:
        if self.spec.pooling is PoolingType.LAST:
            self._sum, self._rows = row_sum, num_rows
            return
        self._sum = row_sum if self._sum is None else self._sum + row_sum
        self._rows += num_rows

    @property
    def rows(self) -> int:
        return self._rows

    def result(self) -> list[float]:
        """The pooled (and, when asked, L2-normalised) embedding. ``RuntimeError`` if no row
        was added."""
        if self._sum is None or self._rows == 0:
            raise RuntimeError("no hidden states were pooled for this request")
        vec = self._sum.double() / self._rows
        if self.spec.normalize:
            vec = torch.nn.functional.normalize(vec, p=2.0, dim=0)
        return vec.float().tolist()


def pool_rows(hidden: torch.Tensor, rows: torch.Tensor, segments: torch.Tensor,
              num_segments: int) -> torch.Tensor:
    """Per-segment sums of ``hidden`` rows: ``hidden`` ``[T, H]`` (any float dtype),
    ``rows`` int64 ``[P]`` row indices, ``segments`` int64 ``[P]`` their segment in
    ``0..num_segments-1``; returns fp32 ``[num_segments, H]`` on ``hidden``'s device."""
    out = torch.zeros(num_segments, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, segments, hidden.index_select(0, rows).float())
