"""Command-line spelling of :class:`~heteroserve.core.config.ServerArgs`.

Every ``ServerArgs`` field becomes ``--field-name`` (SGLang's spellings); a few vLLM aliases
(``--model``, ``--tensor-parallel-size``, ``--gpu-memory-utilization``) map onto them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from heteroserve.core.config import ServerArgs

_ALIASES: dict[str, list[str]] = {
    "model_path": ["--model"],
    "tp_size": ["--tensor-parallel-size", "--tp"],
    "mem_fraction_static": ["--gpu-memory-utilization"],
    "served_model_name": [],
    "kernel": [],
}

_HELP: dict[str, str] = {
    "model_path": "Hugging Face model folder (config.json + safetensors); default: a tiny model built locally",
    "platform": "platform name, or auto (the highest-priority available one)",
    "kernel": "force an implementation for an op, OP=IMPL (repeatable); see `heteroserve platforms --explain`",
    "load_format": "auto|safetensors|dummy (random weights of the real shapes, no files needed)",
    "mem_fraction_static": "fraction of free device memory for weights + KV cache",
    "chunked_prefill_size": "max prompt tokens prefilled per step (longer prompts are chunked)",
    "schedule_policy": "fcfs or lpm (longest prefix match first)",
    "page_size": "KV page size in tokens (default: negotiated with the attention kernel)",
    "kv_cache_dtype": "auto (the model dtype) or fp8_e4m3 (half the bytes per token; the "
                      "attention kernel must list it)",
    "quantization": "fp8|compressed-tensors|awq|gptq: must match the checkpoint's "
                    "quantization_config; fp8 on an unquantized checkpoint quantizes it at load",
    "tool_call_parser": "parse tool calls from chat output: hermes|qwen25|llama3_json|mistral|"
                        "deepseek_v3 (tool_choice required/named need none)",
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
}


def _arg_type(tp: object) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return base if isinstance(base, type) else str


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Add one option per ServerArgs field to ``parser``."""
    hints = typing.get_type_hints(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *_ALIASES.get(f.name, [])]
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(f.name, "") + (f" (default: {default})" if default not in (None, []) else "")
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
        elif f.name == "log_level":
            parser.add_argument(*names, dest=f.name, default=default, help=help_text,
                                choices=("debug", "info", "warning", "error", "critical"))
        elif f.name == "metrics_compat":
            parser.add_argument(*names, dest=f.name, default=None, help=help_text,
                                choices=("vllm", "sglang"))
        elif f.name == "kernel":
            parser.add_argument(*names, dest=f.name, action="append", default=[],
                                metavar="OP=IMPL", help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=_arg_type(tp), default=default,
                                help=help_text)
    parser.add_argument("--disable-log-stats", dest="decode_log_interval", action="store_const",
                        const=0, default=argparse.SUPPRESS,
                        help="vLLM's spelling of --decode-log-interval 0")


def server_args_from_namespace(ns: argparse.Namespace) -> ServerArgs:
    """Build ServerArgs from a parsed namespace (extra attributes are ignored)."""
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(ns).items() if k in names})
