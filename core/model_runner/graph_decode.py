"""Decode steps replayed from device graphs captured per batch size at start-up.

A step of batch size ``b`` runs the graph captured for the smallest size ``>= b``; the rows
beyond ``b`` are padding that reads and writes only the reserved page 0. Inputs are copied
into static buffers first; the logits come back as a slice of the graph's static output.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from heteroserve.core.kernels.attention import AttentionMetadata, ForwardMode
from heteroserve.core.model_runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_bs`` (SGLang's default shape)."""
    sizes = [s for s in (1, 2, 4) if s <= max_bs] + list(range(8, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    """Captured decode graphs of one model runner (see the module docstring)."""

    @classmethod
    def capture_if_supported(cls, runner: Any) -> DecodeGraphs | None:
        backend = type(runner.backend).__name__
        if not runner.backend.graph_safe:
            logger.info("decode graphs off: attention backend %s is not graph-safe", backend)
            return None
        return cls(runner)

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        args = runner.server_args
        max_bs = max(1, min(args.cuda_graph_max_bs, args.max_running_requests))
        self.batch_sizes = capture_sizes(max_bs)
        dev, page = runner.device, runner.page_size
        self.max_pages = -(-runner.max_context_len // page)
        i32 = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)  # noqa: E731
        i64 = lambda n: torch.zeros(n, dtype=torch.int64, device=dev)  # noqa: E731
        self.input_ids, self.positions, self.out_loc = i64(max_bs), i64(max_bs), i64(max_bs)
        self.seq_lens, self.prefix_lens, self.last_len = i32(max_bs), i32(max_bs), i32(max_bs)
        self.qo_indptr = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.page_indptr = i32(max_bs + 1)
        self.page_indices = i32(max_bs * self.max_pages + max_bs)
        self.logits_indices = torch.arange(max_bs, dtype=torch.int64, device=dev)
        self.pad_offsets = torch.arange(1, max_bs + 1, dtype=torch.int32, device=dev)
        self.seq_lens.fill_(1)
        self.last_len.fill_(1)
        self.page_indptr.copy_(torch.arange(max_bs + 1, dtype=torch.int32, device=dev))
        self.graphs: dict[int, Any] = {}
        self.batches: dict[int, ForwardBatch] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        graph_runner = runner.platform.make_graph_runner(dev)
        start = time.perf_counter()
        for bs in reversed(self.batch_sizes):
            batch = self.batches[bs] = self._static_batch(bs)
            runner.backend.begin_graph_capture(batch.attn)
            self.graphs[bs] = graph_runner.capture(lambda b=batch, n=bs: self._record(n, b))
        logger.info("captured decode graphs for %d batch sizes in %.1fs",
                    len(self.batch_sizes), time.perf_counter() - start)

    def _record(self, bs: int, batch: ForwardBatch) -> None:
        self.outputs[bs] = self.runner.forward_eager(batch)

    def _static_batch(self, bs: int) -> ForwardBatch:
        meta = AttentionMetadata(
            mode=ForwardMode.DECODE, page_size=self.runner.page_size,
            qo_indptr=self.qo_indptr[: bs + 1], seq_lens=self.seq_lens[:bs],
            prefix_lens=self.prefix_lens[:bs], kv_page_indptr=self.page_indptr[: bs + 1],
            kv_page_indices=self.page_indices, kv_last_page_len=self.last_len[:bs],
            out_cache_loc=self.out_loc[:bs], seq_lens_cpu=[1] * bs, prefix_lens_cpu=[0] * bs)
        return ForwardBatch(self.input_ids[:bs], self.positions[:bs], meta,
                            self.logits_indices[:bs])

    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Replay for ``batch`` (a decode batch); None when no captured size fits it."""
        b = batch.batch_size
        size = next((s for s in self.batch_sizes if s >= b), None)
        meta = batch.attn
        n_idx = meta.kv_page_indices.numel()
        if size is None or n_idx + (size - b) > self.page_indices.numel():
            return None
        pad = size - b
        self.input_ids[:b].copy_(batch.input_ids)
        self.positions[:b].copy_(batch.positions)
        self.out_loc[:b].copy_(meta.out_cache_loc)
        self.seq_lens[:b].copy_(meta.seq_lens)
        self.prefix_lens[:b].copy_(meta.prefix_lens)
        self.last_len[:b].copy_(meta.kv_last_page_len)
        self.page_indptr[: b + 1].copy_(meta.kv_page_indptr)
        self.page_indices[:n_idx].copy_(meta.kv_page_indices)
        if pad:  # padding rows: one token in reserved page 0
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.out_loc[b:size].zero_()
            self.seq_lens[b:size].fill_(1)
            self.prefix_lens[b:size].zero_()
            self.last_len[b:size].fill_(1)
            self.page_indices[n_idx:n_idx + pad].zero_()
            torch.add(self.pad_offsets[:pad], n_idx, out=self.page_indptr[b + 1:size + 1])
        # host copies of the lengths: a real device graph ignores them (graph-safe backends read
        # only device metadata); an eager replay reads them, so they must be right too
        static = self.batches[size].attn
        static.seq_lens_cpu[:] = meta.seq_lens_cpu + [1] * pad
        static.prefix_lens_cpu[:] = meta.prefix_lens_cpu + [0] * pad
        static.__dict__.pop("block_table", None)
        self.runner.backend.before_graph_replay(static)
        self.graphs[size].replay()
        return self.outputs[size][:b]
