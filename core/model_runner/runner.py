"""The model runner: loads the model, owns the KV cache, runs one forward step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from heteroserve.core.config import ServerArgs
from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.kernels.dispatch import DispatchTable
from heteroserve.core.kernels.linear import LinearSchemeSpec
from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.core.layers.context import ForwardContext, LayerContext
from heteroserve.core.layers.embedding import ParallelLMHead
from heteroserve.core.layers.linear import LinearBase
from heteroserve.core.layers.mla import MLAUpProjection
from heteroserve.core.layers.moe import FusedMoE
from heteroserve.core.loader.weights import fill_dummy, iterate_safetensors
from heteroserve.core.model_runner import kv_storage
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.forward_batch import ForwardBatch
from heteroserve.core.model_runner.pooling import pool_rows
from heteroserve.core.models.config import ModelConfig, ModelLoadError
from heteroserve.core.models.registry import model_class
from heteroserve.core.platform import DeviceEvent, Platform
from heteroserve.core.quantization import QuantFormat
from heteroserve.core.runtime.host_threads import HostThreads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCalls:
    """What a step calls: ``forward(batch, fwd) -> hidden [T, H]`` and ``logits(hidden rows
    [R, H]) -> fp32 [R, vocab]``, and ``compiled_with``, the compile backend's name ("off":
    the model's own methods, run eagerly)."""

    forward: Callable[..., torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    compiled_with: str


def compile_model(model: torch.nn.Module, platform: Platform) -> ModelCalls:
    """The model's forward and LM head compiled with the platform's ``compile_backend()``
    (dynamic shapes, one backend object for both), or its eager methods, with a warning,
    when the platform names no backend.

    Each compiled callable keeps its own compile cache (``isolate_recompiles``: engines of one
    model class in a process never share graphs, whose weights are frozen in) and checks only
    the guards :func:`_step_guards` keeps."""
    backend = platform.compile_backend()
    if backend is None:
        logger.warning("--enable-torch-compile: platform %s has no compile backend; running "
                       "eagerly", platform.name)
        return ModelCalls(model, model.compute_logits, "off")
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))

    def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return torch.compile(fn, backend=backend, dynamic=True, isolate_recompiles=True,
                             options={"guard_filter_fn": _step_guards})

    return ModelCalls(compiled(model), compiled(model.compute_logits), name)


#: the model's forward arguments the runner passes unchanged every step
_FIXED_INPUTS = ("fwd.k_caches", "fwd.v_caches")


def _step_guards(entries: list[Any]) -> list[bool]:
    """dynamo guard filter (which guards a compiled graph checks before each call): drops
    those on the model's modules (nothing changes them after loading) and on the KV caches
    (the same tensors every step): dynamo's lookup went from 0.53 to 0.17 ms a step on a
    12-layer model, under the profiler. Keeps the ones on the step's inputs, which choose
    between the one-token and the multi-token graph. Only sound with a cache of its own per
    compiled model (``isolate_recompiles``)."""
    return [not (e.orig_guard.source.is_unspecialized_nn_module()
                 or e.name.startswith(_FIXED_INPUTS)) for e in entries]


#: tokens of the prefill that traces a compiled model's multi-token graph
COMPILE_WARMUP_TOKENS = 16


class ModelRunner:
    """One rank's model, KV cache and attention backend.

    ``forward(batch) -> logits fp32 [B, vocab]`` runs one step; decode steps replay captured
    graphs when the platform captures them (see :mod:`graph_decode`). ``linear_schemes``:
    the plugins' linear-scheme definitions by name (``PluginCatalog.linear_schemes``).
    ``host_threads``: what ``--cpu-threads`` set for this process (filled in by
    ``build_model_runner``).
    """

    host_threads: HostThreads | None = None

    def __init__(self, server_args: ServerArgs, platform: Platform, dispatch: DispatchTable,
                 model_config: ModelConfig, page_size: int, tp_rank: int = 0, tp_size: int = 1,
                 communicator: Communicator | None = None, device_index: int | None = None,
                 quant: QuantFormat | None = None,
                 linear_schemes: Mapping[str, LinearSchemeSpec] | None = None) -> None:
        self.server_args, self.platform, self.dispatch = server_args, platform, dispatch
        self.model_config = cfg = model_config
        self.page_size = page_size
        self.device = platform.device(server_args.device_index if device_index is None else device_index)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        ctx = LayerContext(dispatch, cfg.dtype, self.device, tp_rank, tp_size,
                           communicator if tp_size > 1 else None, dispatch.request.quant_scheme,
                           quant, server_args.kv_cache_dtype != "auto",
                           dict(linear_schemes or {}), self._fp8_dtype(),
                           not server_args.disable_shared_experts_fusion)
        self.quant = quant
        self.model = model_class(cfg.architecture)(ctx, cfg)
        self._load_weights()
        self._weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.backend = self.model.build_attention_backend(
            page_size, self.device, server_args.max_running_requests, self._kv_cache_dtype())
        self.kv = self._allocate_kv()
        self.num_pages = self.kv.num_pages
        self.max_total_tokens = self.kv.num_tokens
        self.max_context_len = cfg.context_len
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        #: what the attention backend built at start-up (its ``warm_up`` line), or None
        self.attention_warm_up = self._warm_up_attention()
        self.calls = compile_model(self.model, platform) if server_args.enable_torch_compile \
            else ModelCalls(self.model, self.model.compute_logits, "off")
        #: what compiles the model (the backend's name; "off" when it runs eagerly)
        self.compiled_with = self.calls.compiled_with
        if self.compiled_with != "off":
            self._compile_now()
            platform.compiled_model_ready(self.model)
        self.graphs: Any = None
        if platform.capabilities().graph_capture and not server_args.disable_cuda_graph:
            from heteroserve.core.model_runner.graph_decode import DecodeGraphs

            self.graphs = DecodeGraphs.capture_if_supported(self)

    # -- start-up ------------------------------------------------------------------------------
    def _compile_now(self) -> None:
        """Trace and compile the model before serving rather than in a user's first request:
        a prefill of :data:`COMPILE_WARMUP_TOKENS` tokens (the shape every multi-token step,
        decode batches of two or more included, reuses; a backend that specialises kernels
        on the traced size sees a small decode batch), a one-sequence decode step and a
        two-sequence one (the LM head's one-row and many-row graphs), all on the reserved
        page 0."""
        logger.info("compiling the model with %s (a prefill and two decode steps on the "
                    "reserved page)", self.compiled_with)
        start = time.perf_counter()
        n = COMPILE_WARMUP_TOKENS
        pages = [0] * -(-(n + 1) // self.page_size)
        steps = (([SequenceInput(list(range(1, n + 1)), 0, pages)], ForwardMode.EXTEND),
                 ([SequenceInput([1], n, pages)], ForwardMode.DECODE),
                 ([SequenceInput([1], n, pages)] * 2, ForwardMode.DECODE))
        with torch.inference_mode():  # batches as the scheduler's steps build them
            for seqs, mode in steps:
                self.forward_eager(build_forward_batch(seqs, mode, self.page_size, self.device))
        logger.info("model compiled in %.1fs", time.perf_counter() - start)

    def _warm_up_attention(self) -> str | None:
        """The backend's start-up warm-up for prompts up to the context length (or the pool,
        if smaller) in the scheduler's chunks: its line with the time it took, or None."""
        args = self.server_args
        chunk = min(args.chunked_prefill_size, args.max_prefill_tokens)
        start = time.perf_counter()
        note = self.backend.warm_up(min(self.max_context_len, self.max_total_tokens), chunk)
        if note is None:
            return None
        note = f"{note} in {time.perf_counter() - start:.1f}s"
        logger.info("attention warm-up: %s", note)
        return note

    def _load_weights(self) -> None:
        cfg, args = self.model_config, self.server_args
        if args.load_format == "dummy":
            fill_dummy(self.model, seed=args.random_seed)
        else:
            filled = {name.rpartition(".")[0] for name in
                      self.model.load_weights(iterate_safetensors(cfg.path))}
            holders = {name for name, m in self.model.named_modules()
                       if any(True for _ in m.parameters(recurse=False))}
            if cfg.tie_word_embeddings:
                holders.discard("lm_head")
            missing = sorted(holders - filled)
            if missing:
                raise ModelLoadError(f"{cfg.path}: checkpoint has no weights for {len(missing)} "
                                     f"module(s), e.g. {', '.join(missing[:3])}")
            for module in self.model.modules():
                if isinstance(module, (LinearBase, FusedMoE)):
                    module.check_loaded()
                elif isinstance(module, MLAUpProjection):
                    try:
                        module.check_loaded()
                    except ValueError as exc:
                        raise ModelLoadError(f"{cfg.path}: {exc}") from None
        for module in self.model.modules():
            if isinstance(module, (LinearBase, FusedMoE, ParallelLMHead)):
                module.process_weights_after_loading()

    def _fp8_dtype(self) -> torch.dtype | None:
        """The torch dtype of the platform's fp8 flavour, None when it declares none."""
        flavour = self.platform.capabilities().fp8_flavour
        return flavour.torch_dtype if flavour is not None else None

    def _kv_cache_dtype(self) -> torch.dtype | None:
        """``--kv-cache-dtype``: None (the model dtype) or the platform's fp8 dtype."""
        if self.server_args.kv_cache_dtype == "auto":
            return None
        flavour = self.platform.capabilities().fp8_flavour
        if flavour is None:
            raise ValueError(f"--kv-cache-dtype {self.server_args.kv_cache_dtype}: platform "
                             f"{self.platform.name} declares no fp8 flavour")
        return flavour.torch_dtype

    def _allocate_kv(self) -> kv_storage.KVStorage:
        args, cfg = self.server_args, self.model_config
        self.platform.synchronize(self.device)
        free, total = self.platform.memory_info(self.device)
        cache_dtype = self.backend.config.cache_dtype
        page_bytes = kv_storage.bytes_per_page(self.backend, cfg.num_layers, cache_dtype)
        cap = cfg.context_len * args.max_running_requests
        pool_cap = self.platform.capabilities().extra.get("kv_cache_max_bytes")
        pages = kv_storage.plan_num_pages(free, total, args.mem_fraction_static, page_bytes,
                                          self.page_size, args.max_total_tokens, cap, pool_cap)
        return kv_storage.allocate(self.backend, cfg.num_layers, pages, cache_dtype, self.device)

    # -- the step ------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits fp32 ``[R, vocab]`` of the rows ``batch.logits_indices`` names (each
        sequence's last new token unless it asked for all of them)."""
        if self.graphs is not None and batch.attn.mode is ForwardMode.DECODE:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        return self.forward_eager(batch)

    @torch.inference_mode()
    def forward_eager(self, batch: ForwardBatch) -> torch.Tensor:
        return self._run(batch)[0]

    @torch.inference_mode()
    def forward_pooled(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s logits plus, for a batch with ``pooling``, the fp32
        ``[num_pooled, hidden]`` sums of the final-norm hidden states it selects (an empty
        ``[0, hidden]`` tensor without). Always eager (pooling happens in extend steps)."""
        logits, pooled = self._run(batch)
        if pooled is None:
            pooled = torch.zeros(0, self.hidden_size, device=logits.device)
        return logits, pooled

    def _run(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.backend.prepare(batch.attn)
        fwd = ForwardContext(self.backend, self.kv.k_caches, self.kv.v_caches, batch.attn)
        hidden = self.calls.forward(batch, fwd)
        pooled = None
        if batch.pooling is not None:
            p = batch.pooling
            pooled = pool_rows(hidden, p.rows, p.segments, p.num_pooled)
        return self.calls.logits(hidden[batch.logits_indices]), pooled

    def sample(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
        """Next token ids int64 ``[B]`` through the platform's sampling op."""
        return self.dispatch.sampling(logits, params)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor) -> None:
        """Mask ``logits`` rows ``rows`` in place with packed int32 ``bitmask`` rows."""
        self.dispatch.token_bitmask_apply(logits, bitmask, rows)

    def new_event(self) -> DeviceEvent | None:
        """A platform device event (None where the platform has none: no overlap)."""
        return self.platform.new_event()

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as loaded (before a compiled model released any)."""
        return self._weight_bytes
