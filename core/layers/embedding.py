"""Vocabulary-parallel embedding and LM head."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.linear import LinearMethod
from heteroserve.core.layers.context import LayerContext


class VocabParallelEmbedding(nn.Module):
    """Each rank holds ``ceil(vocab / tp)`` rows (zero-padded); lookups of ids outside this
    rank's range give zeros and the all-reduce sums the ranks' parts."""

    def __init__(self, ctx: LayerContext, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.tp_size)
        self.start = ctx.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size, dtype=ctx.dtype,
                                               device=ctx.device), requires_grad=False)

    def load(self, name: str, tensor: torch.Tensor, shard: object = None) -> None:
        part = tensor[self.start:self.start + self.per_rank]
        self.weight.data[: part.shape[0]].copy_(part.to(self.weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.start
        valid = (local >= 0) & (local < self.per_rank)
        out = nn.functional.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        return self.ctx.all_reduce(out * valid.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; each rank computes its vocabulary slice and the
    slices are gathered. ``tie_to`` shares the embedding's weight (tied embeddings).

    Where the platform's unquantized linear method says it serves the LM head
    (``LinearMethod.serves_lm_head``), :meth:`process_weights_after_loading` hands the weight
    to it once (CPU: a oneDNN-packed copy) and :meth:`logits` runs through its ``apply``. A
    tied head then holds its own repacked weight and the embedding keeps the plain one for
    lookups (the table is stored twice)."""

    def __init__(self, ctx: LayerContext, vocab_size: int, hidden_size: int) -> None:
        super().__init__(ctx, vocab_size, hidden_size)
        self.method: LinearMethod | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def process_weights_after_loading(self) -> None:
        """Once, after loading (and tying): let the linear method repack the weight."""
        method_cls = self.ctx.dispatch.linear.get("unquantized")
        if method_cls is None or not method_cls.serves_lm_head or self.method is not None:
            return
        method = method_cls()
        # a fresh parameter on this module only: a tied embedding keeps its own
        plain = self.weight.data
        del self.weight
        self.weight = nn.Parameter(plain, requires_grad=False)
        method.process_weights_after_loading(self)
        self.method = method

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [B, H]`` -> fp32 ``[B, vocab_size]``."""
        if self.method is not None:
            local = self.method.apply(self, hidden).float()
        else:
            local = torch.matmul(hidden, self.weight.t()).float()
        if self.ctx.tp_size > 1 and self.ctx.communicator is not None:
            local = self.ctx.communicator.all_gather(local, dim=-1)
        return local[:, : self.vocab_size]
