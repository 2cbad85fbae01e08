"""Build a model runner from server arguments: plugins, platform, dispatch, KV pool."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from heteroserve.core.config import ServerArgs
from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.kernels.dispatch import (
    DispatchTable, Resolution, negotiate_page_size, parse_kernel_overrides, resolve_dispatch,
)
from heteroserve.core.kernels.ops import linear_op
from heteroserve.core.kernels.registry import KernelRequest
from heteroserve.core.layers.moe import ExpertStorage, expert_storages
from heteroserve.core.model_runner.runner import ModelRunner
from heteroserve.core.models.config import ModelConfig
from heteroserve.core.platform import Platform
from heteroserve.core.quantization import QuantFormat, detect_quantization
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.core.runtime.host_threads import HostThreads, apply_cpu_threads

logger = logging.getLogger(__name__)


def resolve_model_path(server_args: ServerArgs) -> str:
    """``--model-path``, or the default tiny model built locally when none is given."""
    if server_args.model_path:
        return server_args.model_path
    from heteroserve.core.models.tiny import ensure_default_model

    return str(ensure_default_model())


def kernel_request(platform: Platform, cfg: ModelConfig, page_size: int | None,
                   quant: QuantFormat | None = None, kv_cache_dtype: str = "auto",
                   torch_compile: bool = False) -> KernelRequest:
    caps = platform.capabilities()
    return KernelRequest(
        platform=platform.name, device_type=platform.device_type, dtype=cfg.dtype,
        head_size=cfg.head_dim, num_q_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        page_size=page_size, sliding_window=cfg.sliding_window is not None,
        logit_cap=cfg.attn_logit_softcap is not None,
        kv_lora_rank=cfg.raw.get("kv_lora_rank"),
        qk_rope_head_dim=cfg.raw.get("qk_rope_head_dim") if cfg.raw.get("kv_lora_rank") else None,
        platform_page_sizes=caps.kv_page_sizes,
        quant_scheme=quant.schemes()[0] if quant is not None else "unquantized",
        kv_cache_dtype=kv_cache_dtype, torch_compile=torch_compile)


def linear_schemes(quant: QuantFormat | None) -> tuple[str, ...]:
    """The linear schemes an engine resolves: unquantized (LM head neighbours, routers,
    ignored layers) and every scheme the checkpoint's format uses."""
    return tuple(dict.fromkeys(("unquantized", *(quant.schemes() if quant else ()))))


def build_model_runner(server_args: ServerArgs, tp_rank: int = 0,
                       communicator: Communicator | None = None,
                       device_index: int | None = None
                       ) -> tuple[Platform, DispatchTable, ModelRunner]:
    """Select the platform, resolve the dispatch table, load the model, size the KV pool, and
    log one start-up block saying what was decided. Errors are one-line exceptions."""
    catalog = load_plugins()
    platform = catalog.select(server_args.platform, server_args.device)
    index = server_args.device_index if device_index is None else device_index
    platform.set_device(index)
    threads = apply_cpu_threads(server_args.cpu_threads, tp_rank, server_args.tp_size)
    model_path = resolve_model_path(server_args)
    cfg = ModelConfig.from_folder(model_path, server_args.dtype, server_args.context_length)
    if cfg.dtype not in platform.capabilities().dtypes:
        raise ValueError(f"platform {platform.name} does not support {cfg.dtype}; "
                         f"choose --dtype from {platform.capabilities().describe()['dtypes']}")
    quant = detect_quantization(cfg.raw, server_args.quantization, catalog.quant_formats)
    overrides = parse_kernel_overrides(server_args.kernel)
    if server_args.kv_cache_dtype != "auto" and platform.capabilities().fp8_flavour is None:
        raise ValueError(f"--kv-cache-dtype {server_args.kv_cache_dtype}: platform "
                         f"{platform.name} declares no fp8 flavour")
    request = kernel_request(platform, cfg, server_args.page_size, quant,
                             server_args.kv_cache_dtype, server_args.enable_torch_compile)
    request = request.with_page_size(
        negotiate_page_size(catalog.registry, request, overrides.get("attention")))
    dispatch = resolve_dispatch(catalog.registry, request, overrides, linear_schemes(quant))
    runner = ModelRunner(server_args, platform, dispatch, cfg, request.page_size or 1,
                         tp_rank, server_args.tp_size, communicator, index, quant,
                         catalog.linear_schemes)
    runner.host_threads = threads
    if tp_rank == 0:
        logger.info("%s", startup_block(platform, catalog, dispatch, runner, threads))
    return platform, dispatch, runner


def startup_block(platform: Platform, catalog, dispatch: DispatchTable, runner: ModelRunner,
                  threads: HostThreads | None = None) -> str:
    """The one readable block that says what the engine decided."""
    cfg, kv = runner.model_config, runner.kv
    avail = catalog.platforms[platform.name].availability
    extra = platform.capabilities().extra
    lines = [
        "heteroserve engine",
        f"  platform     {platform.name} ({', '.join(avail.devices) or runner.device})",
        *([f"  features     {', '.join(f'{k}={v}' for k, v in extra.items())}"] if extra else []),
        f"  model        {cfg.architecture} from {cfg.path} ({cfg.dtype}, "
        f"{runner.weight_bytes() / 2**30:.2f} GiB weights, load format "
        f"{runner.server_args.load_format}, tp {runner.tp_size})",
        f"  kv cache     {kv.num_pages} pages x {kv.page_size} tokens = {kv.num_tokens} tokens, "
        f"{kv.total_bytes / 2**30:.2f} GiB, layout {runner.backend.kv_layout.value}, "
        f"{str(runner.backend.config.cache_dtype).removeprefix('torch.')}",
        *([f"  host threads {threads.describe()}"] if threads else []),
        *([f"  warm-up      {runner.attention_warm_up}"] if runner.attention_warm_up else []),
        f"  context      {runner.max_context_len} tokens; graphs "
        f"{'captured for ' + str(runner.graphs.batch_sizes) if runner.graphs else 'off'}; "
        f"torch.compile {runner.compiled_with}",
        *[f"  model path   {note}" for note in runner.model.startup_notes()],
    ]
    lines += quantization_lines(runner.quant, dispatch.resolutions,
                                expert_storages(runner.model), cfg.dtype)
    lines.append("  kernels")
    lines += [f"    {op:<22} {impl} ({kind})" for op, impl, kind in dispatch.summary()]
    for f in catalog.failures:
        lines.append(f"  plugin {f.plugin} failed to load: {f.error}")
    return "\n".join(lines)


def quantization_lines(quant: QuantFormat | None,
                       resolutions: Mapping[str, Resolution],
                       experts: Sequence[ExpertStorage] = (),
                       dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The start-up block's quantization section: the format, then per scheme the kernel
    chosen and, where it is not the platform's own, why each native candidate was
    rejected (the reasons their ``supports()`` gave); then, per quantized MoE expert
    storage, whether the experts stay quantized or are dequantized to ``dtype`` and why."""
    if quant is None:
        return []
    lines = [f"  quantization {quant.describe()}"]
    for scheme in quant.schemes():
        res = resolutions[linear_op(scheme)]
        kind = "forced" if res.forced else ("native" if res.native else "fallback")
        what = f": {res.chosen.description}" if res.chosen.description else ""
        lines.append(f"    {scheme:<20} -> {res.chosen.name} ({kind}){what}")
        if not res.native:
            for name, reason in res.rejected:
                if not reason.startswith("lower priority"):
                    lines.append(f"      {name} rejected: {reason}")
    lines += [f"    experts {e.describe(dtype)}" for e in experts]
    lines += [f"    note: {note}" for note in quant.notes()]
    return lines
