"""Turn a scheduler's per-sequence view into a :class:`ForwardBatch` on the device."""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.model_runner.forward_batch import ForwardBatch, PoolingInput
from heteroserve.core.model_runner.pooling import PoolingType


@dataclass
class SequenceInput:
    """One sequence in a step: its new tokens, how many tokens are already cached, and its
    pages in order (covering at least ``prefix_len + len(new_token_ids)`` slots).
    ``all_logits``: compute logits for every new token (prompt logprobs), not only the last.
    ``pool``: also return the fp32 sum of final hidden states of this sequence's last new
    token (``LAST``) or of all its new tokens (``MEAN``); None for ordinary sequences."""

    new_token_ids: list[int]
    prefix_len: int
    pages: list[int]
    all_logits: bool = False
    pool: PoolingType | None = None

    @property
    def num_logit_rows(self) -> int:
        """How many logits rows this sequence gets in the step's output."""
        return len(self.new_token_ids) if self.all_logits else 1


def build_forward_batch(seqs: list[SequenceInput], mode: ForwardMode, page_size: int,
                        device: torch.device) -> ForwardBatch:
    """Build every field of the step's :class:`AttentionMetadata` on the host, then move each
    tensor once. Raises ``ValueError`` when a sequence's pages cannot hold its tokens, or a
    decode sequence has more than one new token.

    Host cost: the Python loop is O(1) per sequence plus C-level list extends; the per-token
    fields (positions, KV slots) come from a few host tensor ops over the whole step (an
    8k-token prompt: 2.6 ms on a 2-core development machine, 6.4 ms with a loop per token)."""
    input_ids: list[int] = []
    qo_indptr = [0]
    page_indptr = [0]
    page_indices: list[int] = []
    seq_lens: list[int] = []
    prefix_lens: list[int] = []
    new_counts: list[int] = []
    last_page_len: list[int] = []
    logit_rows: list[int] = []
    pool_rows: list[int] = []
    pool_segments: list[int] = []
    num_pooled = 0
    for s in seqs:
        n_new = len(s.new_token_ids)
        if n_new == 0 or (mode is ForwardMode.DECODE and n_new != 1):
            raise ValueError(f"{mode.value} sequence with {n_new} new tokens")
        total = s.prefix_len + n_new
        n_pages = -(-total // page_size)
        if len(s.pages) < n_pages:
            raise ValueError(f"sequence of {total} tokens needs {n_pages} pages, has {len(s.pages)}")
        input_ids += s.new_token_ids
        logit_rows += range(qo_indptr[-1] + n_new - s.num_logit_rows, qo_indptr[-1] + n_new)
        if s.pool is not None:
            first = qo_indptr[-1] + (n_new - 1 if s.pool is PoolingType.LAST else 0)
            pool_rows += range(first, qo_indptr[-1] + n_new)
            pool_segments += [num_pooled] * (qo_indptr[-1] + n_new - first)
            num_pooled += 1
        qo_indptr.append(qo_indptr[-1] + n_new)
        page_indices += s.pages[:n_pages]
        page_indptr.append(len(page_indices))
        seq_lens.append(total)
        prefix_lens.append(s.prefix_len)
        new_counts.append(n_new)
        last_page_len.append(total - (n_pages - 1) * page_size)

    pages = _host_int32(page_indices)
    positions, out_loc = _token_slots(prefix_lens, new_counts, page_indptr, pages, page_size,
                                      qo_indptr[-1])
    # two host-to-device copies per step: one per dtype, sliced into fields on the device
    i32_fields = [_host_int32(qo_indptr), _host_int32(seq_lens), _host_int32(prefix_lens),
                  _host_int32(page_indptr), pages, _host_int32(last_page_len)]
    i64_fields = [_host_int64(input_ids), positions, out_loc, _host_int64(logit_rows),
                  _host_int64(pool_rows), _host_int64(pool_segments)]
    i32 = _split(torch.cat(i32_fields), [len(f) for f in i32_fields], device)
    i64 = _split(torch.cat(i64_fields), [len(f) for f in i64_fields], device)
    meta = AttentionMetadata(
        mode=mode, page_size=page_size, qo_indptr=i32[0], seq_lens=i32[1], prefix_lens=i32[2],
        kv_page_indptr=i32[3], kv_page_indices=i32[4], kv_last_page_len=i32[5],
        out_cache_loc=i64[2], seq_lens_cpu=seq_lens, prefix_lens_cpu=prefix_lens)
    pooling = PoolingInput(i64[4], i64[5], num_pooled) if num_pooled else None
    return ForwardBatch(input_ids=i64[0], positions=i64[1], attn=meta, logits_indices=i64[3],
                        pooling=pooling)


def _token_slots(prefix_lens: list[int], new_counts: list[int], page_indptr: list[int],
                 pages: torch.Tensor, page_size: int,
                 num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host int64 ``[T]`` tensors for the step's tokens, grouped by sequence (``pages``: the
    step's int32 page table, sequence ``i``'s pages from ``page_indptr[i]``): each token's
    position (``prefix_len`` up to ``prefix_len + n_new - 1`` per sequence) and its KV slot
    (``page * page_size + position % page_size`` with ``page`` the sequence's
    ``position // page_size``-th page)."""
    counts = _host_int64(new_counts)
    seq_of_token = torch.repeat_interleave(torch.arange(len(new_counts)), counts,
                                           output_size=num_tokens)
    first_token = torch.cumsum(counts, 0) - counts
    start = _host_int64(prefix_lens) - first_token
    positions = torch.arange(num_tokens, dtype=torch.int64) + start[seq_of_token]
    first_page = _host_int64(page_indptr[:-1])
    page_of_token = first_page[seq_of_token] + torch.div(positions, page_size,
                                                         rounding_mode="floor")
    page = pages.long()[page_of_token]
    return positions, page * page_size + positions % page_size


def _host_int64(values: list[int]) -> torch.Tensor:
    """A host int64 tensor of Python ints (through ``array``: a few times faster than
    ``torch.tensor`` on a list)."""
    return _from_array(array("q", values), torch.int64)


def _host_int32(values: list[int]) -> torch.Tensor:
    """A host int32 tensor of Python ints; raises ``OverflowError`` past the int32 range."""
    return _from_array(array("i", values), torch.int32)


def _from_array(host: array, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(host, dtype=dtype) if len(host) else torch.empty(0, dtype=dtype)


def _split(host: torch.Tensor, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
    on_device = host.to(device, non_blocking=True)
    return list(torch.split(on_device, sizes))
