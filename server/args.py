"""Command-line spelling of :class:`~heteroserve.core.config.ServerArgs`.

Every ``ServerArgs`` field becomes ``--field-name`` (SGLang's spellings); vLLM's spellings of
the same options are aliases (``--model``, ``--tensor-parallel-size``, ``--max-model-len``,
``--max-num-seqs``, ``--enforce-eager``...). Options are listed in groups as SGLang's
``--help`` orders them. Abbreviated options are refused (``--device`` must never be read as
``--device-index``). Log levels are case-insensitive.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from heteroserve.core.config import KV_CACHE_DTYPE_ALIASES, LOG_LEVELS, ServerArgs

_ALIASES: dict[str, list[str]] = {
    "model_path": ["--model"],
    "tokenizer_path": ["--tokenizer"],
    "context_length": ["--max-model-len"],
    "tp_size": ["--tensor-parallel-size", "--tp"],
    "mem_fraction_static": ["--gpu-memory-utilization"],
    "max_running_requests": ["--max-num-seqs"],
    "page_size": ["--block-size"],
    "disable_cuda_graph": ["--enforce-eager"],
}

#: aliases only ``serve`` takes (other commands have their own option of that name)
SERVE_ALIASES: dict[str, list[str]] = {"random_seed": ["--seed"]}

_HELP: dict[str, str] = {
    "model_path": "Hugging Face model folder (config.json + safetensors); default: a tiny "
                  "model built locally. `heteroserve serve MODEL` sets it too",
    "tokenizer_path": "tokenizer folder (default: the model folder)",
    "trust_remote_code": "let transformers run Python code shipped in the model folder "
                         "(custom tokenizer classes)",
    "context_length": "the model's context window in tokens (default: from config.json)",
    "served_model_name": "the name clients put in `model` (default: the model path)",
    "chat_template": "Jinja chat template for /v1/chat/completions, a file path or the "
                     "template text itself; replaces the tokenizer's",
    "platform": "platform name, or auto (the highest-priority available one)",
    "device": "torch device type (cpu, cuda, xpu, npu...): run on the platform that drives "
              "it (default: --platform decides)",
    "kernel": "force an implementation for an op, OP=IMPL (repeatable); see "
              "`heteroserve platforms --explain`",
    "load_format": "auto|safetensors|dummy (random weights of the real shapes, no files needed)",
    "mem_fraction_static": "fraction of free device memory for weights + KV cache",
    "max_running_requests": "most requests decoded together",
    "chunked_prefill_size": "max prompt tokens prefilled per step (longer prompts are chunked)",
    "schedule_policy": "fcfs or lpm (longest prefix match first)",
    "page_size": "KV page size in tokens (default: negotiated with the attention kernel)",
    "disable_cuda_graph": "no graph capture on any platform (vLLM: --enforce-eager)",
    "enable_mixed_chunk": "running decodes get their next token inside prefill (extend) "
                          "steps instead of waiting for a decode step (SGLang's flag)",
    "disable_shared_experts_fusion": "DeepSeek: run the shared experts as a separate MLP, "
                                     "not as extra experts of the fused MoE call",
    "kv_cache_dtype": "auto (the model dtype) or fp8_e4m3 (also spelled fp8 / fp8_e4m3fn; "
                      "half the bytes per token; the attention kernel must list it)",
    "quantization": "fp8|compressed-tensors|awq|gptq (awq_marlin, gptq_marlin: the same "
                    "formats) or a quant_method an installed plugin adds (an unknown name "
                    "is refused at start-up with the list): must match the checkpoint's "
                    "quantization_config; fp8 on an "
                    "unquantized checkpoint quantizes it at load",
    "tool_call_parser": "parse tool calls from chat output: hermes|qwen25|llama3_json|mistral|"
                        "deepseek_v3 (tool_choice required/named need none)",
    "lazy_grammar_workers": "start the two grammar compiler processes (about 340 MB each) at "
                            "the first structured-output request, which then waits seconds, "
                            "instead of at start-up",
    "metrics_compat": "also expose /metrics under vLLM's (vllm:...) or SGLang's (sglang:...) "
                      "names and labels, so their Grafana dashboards work unchanged",
    "decode_log_interval": "log one throughput line (running requests, KV tokens and usage, "
                           "generation token/s, queue) every N decode steps, at most once a "
                           "second; 0 turns it off (vLLM: --disable-log-stats)",
    "cpu_threads": "torch intra-op threads of each engine process: auto (the cores it may run "
                   "on, split between tensor-parallel ranks), a count, or a core list such as "
                   "0-3 to bind to (ranks: 0-3|4-7)",
    "embedding_pooling": "/v1/embeddings pooling of the final hidden states when a request "
                         "names none: last (token) or mean",
    "disable_embedding_normalize": "return embeddings as pooled, not scaled to unit L2 norm",
    "enable_metrics": "accepted for SGLang/vLLM command lines: heteroserve always serves "
                      "Prometheus metrics at /metrics",
    "log_level": "debug|info|warning|error|critical (any case)",
}

#: ``--help`` groups, in SGLang's order; a field in none of them goes under "other options"
GROUPS: dict[str, tuple[str, ...]] = {
    "model and tokenizer": ("model_path", "tokenizer_path", "trust_remote_code", "load_format",
                            "context_length", "served_model_name", "chat_template"),
    "quantization and data type": ("dtype", "quantization", "kv_cache_dtype"),
    "memory and scheduling": ("mem_fraction_static", "max_total_tokens", "page_size",
                              "chunked_prefill_size", "max_prefill_tokens",
                              "max_running_requests", "schedule_policy", "disable_radix_cache",
                              "disable_overlap_schedule", "enable_mixed_chunk",
                              "stream_interval", "random_seed"),
    "platform, device and kernels": ("platform", "device", "device_index", "kernel",
                                     "cpu_threads", "disable_cuda_graph", "cuda_graph_max_bs",
                                     "enable_torch_compile", "disable_shared_experts_fusion"),
    "parallelism": ("tp_size", "nnodes", "node_rank", "dist_init_addr"),
    "HTTP server": ("host", "port", "api_key", "max_queued_requests", "max_request_bytes",
                    "keep_serving_on_engine_death"),
    "logging and metrics": ("log_level", "enable_metrics", "metrics_compat",
                            "decode_log_interval"),
    "API options": ("reasoning_parser", "tool_call_parser", "grammar_compile_timeout",
                    "grammar_max_bytes", "grammar_cache_bytes", "lazy_grammar_workers"),
    "embeddings": ("embedding_pooling", "disable_embedding_normalize"),
}


def _arg_type(tp: object) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return base if isinstance(base, type) else str


def log_level_arg(value: str) -> str:
    level = value.lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                         f"{', '.join(LOG_LEVELS)}, any case)")
    return level


def _groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """New option groups on ``parser`` by title: :data:`GROUPS` plus "other options"."""
    return {title: parser.add_argument_group(title) for title in (*GROUPS, "other options")}


def add_server_args(parser: argparse.ArgumentParser, serve: bool = False
                    ) -> dict[str, argparse._ArgumentGroup]:
    """Add one option per ServerArgs field to ``parser``, in ``--help`` groups, and refuse
    abbreviations; ``serve`` adds :data:`SERVE_ALIASES` too. Returns the groups by title so
    that a command can add its own options to them."""
    parser.allow_abbrev = False
    hints = typing.get_type_hints(ServerArgs)
    groups = _groups(parser)
    title_of = {name: title for title, names in GROUPS.items() for name in names}
    for f in dataclasses.fields(ServerArgs):
        group = groups[title_of.get(f.name, "other options")]
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *_ALIASES.get(f.name, []),
                 *(SERVE_ALIASES.get(f.name, []) if serve else [])]
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, []) else "")
        if tp is bool:
            group.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif f.name == "log_level":
            group.add_argument(*names, dest=f.name, default=default, help=help_text,
                               type=log_level_arg, metavar="LEVEL")
        elif f.name == "kv_cache_dtype":
            group.add_argument(*names, dest=f.name, default=default, help=help_text,
                               choices=("auto", "fp8_e4m3", *KV_CACHE_DTYPE_ALIASES))
        elif f.name == "metrics_compat":
            group.add_argument(*names, dest=f.name, default=None, help=help_text,
                               choices=("vllm", "sglang"))
        elif f.name == "kernel":
            group.add_argument(*names, dest=f.name, action="append", default=[],
                               metavar="OP=IMPL", help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=_arg_type(tp), default=default,
                               help=help_text)
    groups["logging and metrics"].add_argument(
        "--disable-log-stats", dest="decode_log_interval", action="store_const", const=0,
        default=argparse.SUPPRESS, help="vLLM's spelling of --decode-log-interval 0")
    return groups


def add_positional_model(parser: argparse.ArgumentParser) -> None:
    """``heteroserve serve MODEL`` (vLLM's ``vllm serve MODEL``): the model folder as the
    first positional argument, the same as ``--model-path``."""
    parser.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                        help="the model folder (the same as --model-path)")


def server_args_from_namespace(ns: argparse.Namespace) -> ServerArgs:
    """Build ServerArgs from a parsed namespace (extra attributes are ignored). A positional
    ``MODEL`` sets ``model_path``; ``ValueError`` when it contradicts ``--model-path``."""
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    tag = getattr(ns, "model_tag", None)
    if tag is not None:
        if values.get("model_path") not in (None, tag):
            raise ValueError(f"the positional model {tag!r} contradicts --model-path "
                             f"{values['model_path']!r}; give one of them")
        values["model_path"] = tag
    return ServerArgs(**values)
