"""What a ``torch.compile``d model needs from the cpu platform (``--enable-torch-compile``).

* :class:`InductorWithFreezing`, the platform's compile backend: inductor with *freezing*,
  which takes the weights into the compiled graph as constants, and with its GEMM autotuning
  (``max_autotune`` over its C++ GEMM templates and aten's oneDNN/MKL products): each linear
  of the traced shape gets the faster of a generated C++ GEMM specialised to it (on the
  one-token decode graph, a matrix-vector kernel with no per-call library overhead) and the
  library call, on weights it packs once at compile time. A compiled model's linears
  therefore keep plain weights (the registry picks ``torch_native`` for them), and
  :meth:`InductorWithFreezing.release_traced_weights` frees those plain copies once every
  graph is compiled.
  The elementwise work between the products (norms, rotary, activations, residual adds)
  becomes a few generated C++ loops.
* :func:`paged_attention`, the paged attention as one opaque custom op
  (``heteroserve_cpu::paged_attention``): the torch-native backend keeps host-side state per
  step (slot plans, the decode K/V mirror) that a trace cannot hold, so the compiled graph
  calls the eager backend through it. The op writes the new K/V into the caches it is given
  (declared mutated) and reads the step's metadata from the backend, which the runner
  prepares before every forward.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from heteroserve.core.kernels.attention import AttentionLayer
from heteroserve.core.layers.embedding import ParallelLMHead
from heteroserve.core.layers.linear import LinearBase

if TYPE_CHECKING:
    from heteroserve.platforms.cpu.attention import TorchNativeAttention

#: backends reachable from the custom op, by the handle they registered under
_BACKENDS: weakref.WeakValueDictionary[int, TorchNativeAttention] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)
logger = logging.getLogger(__name__)

#: inductor settings of this backend's compiles: autotune each GEMM between inductor's C++
#: templates and aten's product (on the weights freezing made constants), without printing
#: each choice's timing table
GEMM_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                 "autotune_num_choices_displayed": 0}


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would build its CPU kernels with ($CXX, g++, c++, clang++),
    None when there is none."""
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++")
                 if c and shutil.which(c)), None)


class InductorWithFreezing:
    """``torch.compile`` backend: inductor with :data:`GEMM_AUTOTUNE`, for graphs dynamo
    traced with inductor's ``freezing`` on (:meth:`CpuPlatform.compile_backend` turns it on
    for the process, since dynamo reads it while tracing; inference graphs only, the runner
    calls the model under ``torch.inference_mode``). One per compiled model: it counts the
    graph breaks of that model's trace for :meth:`release_traced_weights`."""

    __name__ = "inductor_with_freezing"

    def __init__(self) -> None:
        self._breaks_before = graph_breaks()

    def __call__(self, gm: torch.fx.GraphModule,
                 example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=GEMM_AUTOTUNE)

    def release_traced_weights(self, model: torch.nn.Module) -> int:
        """Free the plain weights of ``model``'s ``torch_native`` linears, its LM head's
        included unless tied to the embedding table, once every graph is compiled: their
        GEMMs read the copies inductor packed into the graphs. Each weight Parameter stays
        (dynamo drops a compiled graph when a tensor it traced is freed) but its storage
        becomes an empty tensor's, so anything that would still run the module (an eager
        fallback, a trace) fails on the shape instead of computing with stale data. Only when
        the trace had no graph break: a break leaves some modules running eagerly between
        graphs, and they need their weights. Returns the bytes released."""
        from heteroserve.platforms.cpu.linear import UnquantizedLinear

        breaks = graph_breaks() - self._breaks_before
        if breaks:
            logger.info("the compiled model has %d graph break(s): its linears keep their "
                        "plain weights next to the compiled copies", breaks)
            return 0
        storages = Counter(p.untyped_storage().data_ptr() for p in model.parameters()
                           if not p.is_mkldnn)
        released = 0
        for module in model.modules():
            method = getattr(module, "method", None)
            weight = module._parameters.get("weight")
            if (isinstance(module, (LinearBase, ParallelLMHead)) and weight is not None
                    and type(method) is UnquantizedLinear and weight.dim() == 2
                    and not weight.is_mkldnn
                    and storages[weight.untyped_storage().data_ptr()] == 1):  # not tied
                released += weight.numel() * weight.element_size()
                weight.data = torch.empty(0, dtype=weight.dtype)
        return released


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def register_backend(backend: TorchNativeAttention) -> int:
    """A handle under which :func:`paged_attention` finds ``backend`` (weakly held)."""
    handle = next(_HANDLES)
    _BACKENDS[handle] = backend
    return handle


#: the op's library: defined through ``torch.library.Library`` rather than ``custom_op``, whose
#: Python wrapper (autograd and argument bookkeeping) cost about 100 us a call
_LIB = torch.library.Library("heteroserve_cpu", "DEF")
_LIB.define("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
            "Tensor(b!) v_cache, int handle, int layer_id, float scale, int? sliding_window, "
            "float? logit_cap) -> Tensor")


def _paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, handle: int,
                          layer_id: int, scale: float, sliding_window: int | None,
                          logit_cap: float | None) -> torch.Tensor:
    backend = _BACKENDS[handle]
    layer = AttentionLayer(layer_id, scale, sliding_window, logit_cap)
    return backend.forward_eager(q, k, v, k_cache, v_cache, layer, backend.current_meta())


def _paged_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, handle: int,
                          layer_id: int, scale: float, sliding_window: int | None,
                          logit_cap: float | None) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_LIB.impl("paged_attention", _paged_attention_impl, "CPU")
torch.library.register_fake("heteroserve_cpu::paged_attention", _paged_attention_fake, lib=_LIB)


def paged_attention(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    layer: AttentionLayer) -> torch.Tensor:
    """The backend registered under ``handle``: write ``k/v [T, Hk, D]`` to the caches, then
    attend ``q [T, Hq, D]`` as the prepared step's mode says; returns ``[T, Hq, D]``."""
    return torch.ops.heteroserve_cpu.paged_attention(
        q, k, v, k_cache, v_cache, handle, layer.layer_id, layer.scale, layer.sliding_window,
        layer.logit_cap)
