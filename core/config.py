"""Engine and server arguments, shared by ``heteroserve.Engine``, the CLI and the server.

Names follow SGLang's ``ServerArgs`` (and vLLM's where SGLang has none) so that users can
carry their flags over.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: vLLM's and SGLang's spellings of the fp8 KV cache (both mean e4m3 on every platform here)
KV_CACHE_DTYPE_ALIASES = {"fp8": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3"}
#: vLLM's/SGLang's names for a checkpoint format plus a kernel choice; the platform's
#: registry picks the kernel here, so they mean the format
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}


@dataclass
class ServerArgs:
    """Every option of an engine. Validation errors raise ``ValueError`` with one line."""

    model_path: str | None = None
    tokenizer_path: str | None = None
    trust_remote_code: bool = False  # let transformers run code shipped with the checkpoint
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    quantization: str | None = None  # None: from config.json | fp8 | compressed-tensors | awq | gptq | a plugin's
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8_e4m3
    context_length: int | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # a Jinja file or inline Jinja; replaces the tokenizer's
    random_seed: int = 0

    platform: str = "auto"
    kernel: list[str] = field(default_factory=list)  # OP=IMPL overrides
    device: str | None = None  # a torch device type: picks the platform that drives it
    device_index: int = 0

    mem_fraction_static: float = 0.85
    max_total_tokens: int | None = None  # cap on KV slots (overrides the memory-based size)
    page_size: int | None = None  # None: negotiated with the attention backend
    chunked_prefill_size: int = 8192
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    schedule_policy: str = "fcfs"  # fcfs | lpm
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    enable_mixed_chunk: bool = False  # running decodes ride along in prefill (extend) steps
    disable_cuda_graph: bool = False  # SGLang's spelling; disables any platform's graph capture
    cuda_graph_max_bs: int = 256
    enable_torch_compile: bool = False  # compile with the platform's compile_backend()
    disable_shared_experts_fusion: bool = False  # DeepSeek: shared experts as a separate MLP

    tp_size: int = 1
    cpu_threads: str = "auto"  # torch intra-op threads: auto | N | core list "0-3" (binds)
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    enable_metrics: bool = False  # accepted for SGLang/vLLM command lines; /metrics is always on
    max_queued_requests: int | None = None
    log_level: str = "info"
    metrics_compat: str | None = None  # vllm | sglang: /metrics also under that engine's names
    decode_log_interval: int = 40  # decode steps between throughput log lines; 0: none
    stream_interval: int = 1

    reasoning_parser: str | None = None  # deepseek-r1 | qwen3
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral | qwen25 | deepseek_v3
    grammar_compile_timeout: float = 10.0
    grammar_max_bytes: int = 256 * 1024  # largest schema / regex / grammar text
    grammar_cache_bytes: int = 64 * 1024 * 1024  # compiled-grammar cache size
    lazy_grammar_workers: bool = False  # else the grammar compiler processes start at start-up
    max_request_bytes: int = 32 * 1024 * 1024  # largest HTTP request body (413 beyond)
    keep_serving_on_engine_death: bool = False  # else the server exits when the engine dies
    embedding_pooling: str = "last"  # last | mean: /v1/embeddings' default pooling
    disable_embedding_normalize: bool = False  # else embeddings are scaled to unit L2 norm

    def __post_init__(self) -> None:
        self.log_level = self.log_level.lower()
        self.kv_cache_dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.quantization is not None:
            # the method itself is checked where the plugins' formats are known
            # (detect_quantization), so a plugin's method works here too
            self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level!r}")
        if self.device is not None and not self.device.strip():
            raise ValueError("--device must name a torch device type such as cpu")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError(f"--mem-fraction-static must be in (0, 1], got {self.mem_fraction_static}")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"--schedule-policy must be fcfs or lpm, got {self.schedule_policy!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"--load-format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16"):
            raise ValueError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ValueError(f"--kv-cache-dtype must be auto or fp8_e4m3, got {self.kv_cache_dtype!r}")
        for name in ("chunked_prefill_size", "max_running_requests", "tp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.page_size is not None and self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("--max-prefill-tokens must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("--stream-interval must be >= 1")
        if self.embedding_pooling not in ("last", "mean"):
            raise ValueError(f"--embedding-pooling must be last or mean, got "
                             f"{self.embedding_pooling!r}")
        if self.metrics_compat is not None and self.metrics_compat not in ("vllm", "sglang"):
            raise ValueError(f"--metrics-compat must be vllm or sglang, got {self.metrics_compat!r}")
        if self.decode_log_interval < 0:
            raise ValueError("--decode-log-interval must be >= 0 (0 turns the log off)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ServerArgs:
        """Build from keyword arguments, rejecting unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path or "heteroserve-default"
