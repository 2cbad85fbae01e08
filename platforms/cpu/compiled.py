"""What a ``torch.compile``d model needs from the cpu platform (``--enable-torch-compile``).

* :func:`inductor_with_freezing`, the platform's compile backend: inductor with *freezing*,
  which takes the weights into the compiled graph as constants. The linears keep the
  oneDNN-packed weights :class:`~heteroserve.platforms.cpu.linear.OneDNNPrepackedLinear`
  made at load (inductor's oneDNN lowering calls the same product on them, and needs them
  to be constants; no second copy is made); plain weights of other dtypes it packs itself.
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
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from heteroserve.core.kernels.attention import AttentionLayer

if TYPE_CHECKING:
    from heteroserve.platforms.cpu.attention import TorchNativeAttention

#: backends reachable from the custom op, by the handle they registered under
_BACKENDS: weakref.WeakValueDictionary[int, TorchNativeAttention] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def inductor_with_freezing(gm: torch.fx.GraphModule,
                           example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    """``torch.compile`` backend: inductor, for graphs dynamo traced with inductor's
    ``freezing`` on (:meth:`CpuPlatform.compile_backend` turns it on for the process, since
    dynamo reads it while tracing; inference graphs only, the runner calls the model under
    ``torch.inference_mode``)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


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
