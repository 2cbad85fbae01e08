"""What every layer needs at build time, passed explicitly instead of through globals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.kernels.attention import AttentionBackend, AttentionMetadata
from heteroserve.core.kernels.dispatch import DispatchTable
from heteroserve.core.kernels.linear import LinearSchemeSpec
from heteroserve.core.kernels.mla import MLABackend
from heteroserve.core.quantization.base import QuantFormat


@dataclass
class LayerContext:
    """Build-time facts: the dispatch table, parameter dtype and device, and this rank's place
    in the tensor-parallel group (``communicator`` is None when ``tp_size == 1``).
    ``quant``: the checkpoint's quantization format (None: every linear layer uses
    ``quant_scheme``); ``kv_cache_fp8``: the KV cache is fp8 (checkpoint K/V scales apply);
    ``linear_schemes``: the definitions of the linear schemes plugins added, by name (what
    :class:`~heteroserve.core.layers.moe.FusedMoE` dequantizes a plugin scheme's experts
    with); ``fp8_dtype``: the torch dtype of the platform's fp8 flavour (None: it declares
    none), which decides whether fp8 MoE experts can stay fp8; ``fuse_shared_experts``:
    models with always-on shared experts may run them as extra experts of the fused MoE
    (False: ``--disable-shared-experts-fusion``, always a separate MLP)."""

    dispatch: DispatchTable
    dtype: torch.dtype
    device: torch.device
    tp_rank: int = 0
    tp_size: int = 1
    communicator: Communicator | None = None
    quant_scheme: str = "unquantized"
    quant: QuantFormat | None = None
    kv_cache_fp8: bool = False
    linear_schemes: Mapping[str, LinearSchemeSpec] = field(default_factory=dict)
    fp8_dtype: torch.dtype | None = None
    fuse_shared_experts: bool = True

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.communicator is None or self.tp_size == 1 else self.communicator.all_reduce(x)


@dataclass
class ForwardContext:
    """Per-step state the attention layers read: the backend, the KV caches, the metadata.
    With an :class:`MLABackend`, ``k_caches`` are the latent caches and ``v_caches`` is empty."""

    backend: AttentionBackend | MLABackend
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    meta: AttentionMetadata
