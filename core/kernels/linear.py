"""The linear-method contract: how a (possibly quantized) linear layer stores and applies
its weights.

A model layer owns the tensors; the method says which tensors a checkpoint provides
(:meth:`LinearMethod.create_weights`), may repack them once after loading
(:meth:`LinearMethod.process_weights_after_loading`, where a vendor converts to its own
layout), and computes ``y = x @ W^T (+ bias)`` (:meth:`LinearMethod.apply`). A method may
also fold the RMSNorm or SiLU-and-mul that feeds the layer into its kernel
(:meth:`LinearMethod.apply_rms_norm`, :meth:`LinearMethod.apply_silu_and_mul`), or the gated
activation that follows it (:meth:`LinearMethod.apply_gated`), for the inputs where that
pays, such as the one-row decode step.

Schemes and their checkpoint tensors (``N`` = output features, ``K`` = input features):

- ``unquantized``: ``weight [N, K]`` in the model dtype.
- ``fp8_per_tensor`` (W8A8): ``weight [N, K]`` fp8 e4m3, ``weight_scale [1]`` fp32;
  activations quantized dynamically per tensor. ``W ≈ weight * weight_scale``. For both fp8
  schemes, activations are quantized to the fp8 format the layer's ``weight`` holds after
  ``process_weights_after_loading`` (a platform whose fp8 flavour is e4m3fnuz converts the
  checkpoint's e4m3fn weight there, and its activations follow). The same holds for
  ``fp8_per_channel``.
- ``fp8_per_channel`` (W8A8): ``weight [N, K]`` fp8 e4m3, ``weight_scale [N, 1]`` fp32 (per
  output channel); activations quantized dynamically per token. ``W[n] ≈ weight[n] *
  weight_scale[n]``.
- ``fp8_block`` (W8A8, DeepSeek style): ``weight [N, K]`` fp8, ``weight_scale_inv
  [ceil(N/128), ceil(K/128)]`` fp32 (one scale per 128x128 block); activations quantized
  dynamically per token and per 128-column group.
- ``int8_w8a8``: ``weight [N, K]`` int8, ``weight_scale [N, 1]`` fp32 (per output channel);
  activations quantized dynamically per token, symmetric.
- ``awq_w4a16``: ``qweight [K, N/8]`` int32, ``qzeros [K/G, N/8]`` int32, ``scales [K/G, N]``
  fp16; eight 4-bit values per int32 in AWQ's interleaved order (nibble ``j`` of a word holds
  column ``8*w + AWQ_ORDER[j]``); ``W[n, k] = (q[k, n] - z[k//G, n]) * s[k//G, n]``.
- ``gptq_w4a16``: ``qweight [K/8, N]`` int32 (eight rows per word, nibble ``j`` = row
  ``8*w + j``), ``qzeros [K/G, N/8]`` int32 (stored value is zero point minus 1, GPTQ v1),
  ``scales [K/G, N]`` fp16, ``g_idx [K]`` int32 (group of each input row; absent means
  ``k // G``); ``W[n, k] = (q[k, n] - (z[g_idx[k], n] + 1)) * s[g_idx[k], n]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

LINEAR_SCHEMES: tuple[str, ...] = (
    "unquantized", "fp8_per_tensor", "fp8_per_channel", "fp8_block", "int8_w8a8", "awq_w4a16", "gptq_w4a16",
)

#: AWQ packs column ``AWQ_ORDER[j]`` of each group of eight into nibble ``j``.
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
FP8_BLOCK: int = 128


@dataclass(frozen=True)
class ParamSpec:
    """One checkpoint tensor a linear method expects: its shape and dtype, and where the
    layer's output and input features lie in it, so that loaders can place fused shards and
    slice tensor-parallel parts of any layout.

    ``output_dim`` is the dimension indexed by output features (None: the tensor does not
    depend on them, e.g. a per-tensor scale or ``g_idx``); one index along it covers
    ``output_pack`` consecutive output features (8 for nibble-packed columns, 128 for fp8
    block scales). ``input_dim`` and ``input_pack`` say the same of the input features
    (``input_pack`` is the group size for per-group tensors)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    output_dim: int | None = None
    output_pack: int = 1
    input_dim: int | None = None
    input_pack: int = 1


@dataclass(frozen=True)
class LinearSchemeSpec:
    """A linear scheme a plugin adds (hook ``heteroserve_linear_schemes``): its definition,
    so that the conformance suite can certify every ``linear.<name>`` kernel of it.

    ``quantize``: float64 ``W [N, K]`` -> the scheme's checkpoint tensors, named and laid out
    as its kernels' ``create_weights`` declares them. ``dequantize``: those tensors ->
    float64 ``W [N, K]``, the scheme's meaning; the oracle is ``x @ dequantize(...)^T``
    with ``x`` unquantized (weight-only schemes); MoE experts stored in the scheme are
    dequantized with it at load. ``name`` must not be a built-in scheme.
    ``provider``: filled in by the loader.
    """

    name: str
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    dequantize: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    description: str = ""
    provider: str = ""


@dataclass(frozen=True)
class LinearShape:
    """A linear layer's size and options. ``group_size`` is used by the W4A16 schemes."""

    input_size: int
    output_size: int
    params_dtype: torch.dtype
    group_size: int = 128
    has_g_idx: bool = False


#: activations :meth:`LinearMethod.apply_gated` may be asked to fuse
GATED_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh")


class LinearMethod(ABC):
    """Stores and applies one scheme's weights.

    ``apply`` takes ``x [..., K]`` in the model dtype (bf16/fp16/fp32) and returns ``[..., N]``
    in the same dtype. It must not change ``x``. After ``process_weights_after_loading`` the
    layer's parameters may have any layout the method likes; only ``apply`` reads them.
    Errors: a shape the scheme cannot hold (``K`` not a multiple of ``group_size`` for W4A16,
    ``N`` not a multiple of 8 for packed schemes) raises ``ValueError`` in ``create_weights``.
    """

    scheme: str
    #: True: the LM head (an unquantized ``[vocab, hidden]`` projection) also runs through
    #: this method's ``process_weights_after_loading`` and ``apply``; False: it stays one plain
    #: ``matmul`` on the embedding-shaped weight. Set it where the method beats the plain
    #: product for that shape (CPU's oneDNN prepacking does, several-fold at decode sizes).
    serves_lm_head: bool = False

    def create_weights(self, shape: LinearShape) -> dict[str, ParamSpec]:
        """The tensors a checkpoint provides for a layer of ``shape``, by parameter name
        (the scheme's layout, :func:`checkpoint_specs`). Override to add tensors, or, for a
        scheme a plugin adds (not in :data:`LINEAR_SCHEMES`), to declare all of them."""
        return checkpoint_specs(self.scheme, shape)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack ``layer``'s loaded parameters for :meth:`apply` (default: keep as loaded)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias`` with ``W`` as the scheme defines it."""

    def apply_rms_norm(self, layer: torch.nn.Module, x: torch.Tensor,
                       residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       bias: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional fusion of the pre-norm in front of this projection.

        With ``h = x + residual`` rounded to ``x.dtype`` (``h = x`` when ``residual`` is
        None), returns ``(apply(rms_norm(h, norm_weight, eps)), h)``, where the normalised row
        may stay in fp32 instead of being rounded to ``x.dtype``. ``x``, ``residual`` ``[T,
        K]``, ``norm_weight [K]``. Must not modify ``x`` or ``residual``; ``h`` is a new
        tensor, or ``x`` itself without a residual. Returns None (the default) when the method
        has no fused kernel for this input; the caller then runs the norm and ``apply``."""
        return None

    def apply_upcast(self, layer: torch.nn.Module, x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Optional (since plugin API 1.5): ``x`` in a float dtype narrower than this layer's
        (bf16/fp16 activations into an fp32 layer, such as DeepSeek's router) ->
        ``apply(x.to(layer dtype), bias)``, in the layer's dtype, without a separate cast
        (the widening is exact, so the result is the same). Must not modify ``x``. Returns
        None (the default) when the method has no such kernel for this input; the caller then
        casts and calls ``apply``."""
        return None

    def apply_silu_and_mul(self, layer: torch.nn.Module, x: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Optional fusion of the gated activation in front of this projection: ``x [T, 2K]``
        = ``[gate | up]`` -> ``apply(silu(gate) * up)``. Must not modify ``x``. Returns None
        (the default) when the method has no fused kernel for this input."""
        return None

    def apply_gated(self, layer: torch.nn.Module, x: torch.Tensor, activation: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Optional fusion of the gated activation after this projection, whose ``2N``
        outputs are ``[gate | up]``: ``x [T, K]`` -> ``act(gate) * up`` ``[T, N]`` in
        ``x.dtype``, with ``gate, up = split(apply(x, bias))`` (they may stay in fp32 instead
        of being rounded to ``x.dtype`` first). ``activation``: one of
        :data:`GATED_ACTIVATIONS` (``silu``; ``gelu``, erf; ``gelu_tanh``, the tanh
        approximation). Must not modify ``x``. Returns None (the default) when the method
        has no fused kernel for this input; the caller then runs ``apply`` and the
        activation op."""
        return None


def _w4_group(shape: LinearShape, k_multiple: int) -> int:
    """The group size (``-1``: one group over all of K); ``ValueError`` if unpackable."""
    k, n = shape.input_size, shape.output_size
    group = k if shape.group_size == -1 else shape.group_size
    if group <= 0 or k % group:
        raise ValueError(f"input size {k} is not a multiple of group size {shape.group_size}")
    if n % 8 or k % k_multiple:
        raise ValueError(f"4-bit packing needs output size % 8 == 0 and input size % "
                         f"{k_multiple} == 0, got N={n}, K={k}")
    return group


def checkpoint_specs(scheme: str, shape: LinearShape) -> dict[str, ParamSpec]:
    """The checkpoint tensors of ``scheme`` for a layer of ``shape`` (see the module
    docstring for their meaning). Raises ``ValueError`` for an unknown scheme or a shape the
    scheme cannot hold."""
    n, k = shape.output_size, shape.input_size
    rows = dict(output_dim=0, input_dim=1)  # an [N, K] tensor
    if scheme == "unquantized":
        return {"weight": ParamSpec((n, k), shape.params_dtype, **rows)}
    if scheme == "fp8_per_tensor":
        return {"weight": ParamSpec((n, k), torch.float8_e4m3fn, **rows),
                "weight_scale": ParamSpec((1,), torch.float32)}
    if scheme == "fp8_per_channel":
        return {"weight": ParamSpec((n, k), torch.float8_e4m3fn, **rows),
                "weight_scale": ParamSpec((n, 1), torch.float32, output_dim=0)}
    if scheme == "fp8_block":
        return {"weight": ParamSpec((n, k), torch.float8_e4m3fn, **rows),
                "weight_scale_inv": ParamSpec((-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)),
                                              torch.float32, 0, FP8_BLOCK, 1, FP8_BLOCK)}
    if scheme == "int8_w8a8":
        return {"weight": ParamSpec((n, k), torch.int8, **rows),
                "weight_scale": ParamSpec((n, 1), torch.float32, output_dim=0)}
    if scheme == "awq_w4a16":
        group = _w4_group(shape, 1)
        return {"qweight": ParamSpec((k, n // 8), torch.int32, 1, 8, 0, 1),
                "qzeros": ParamSpec((k // group, n // 8), torch.int32, 1, 8, 0, group),
                "scales": ParamSpec((k // group, n), torch.float16, 1, 1, 0, group)}
    if scheme == "gptq_w4a16":
        group = _w4_group(shape, 8)
        specs = {"qweight": ParamSpec((k // 8, n), torch.int32, 1, 1, 0, 8),
                 "qzeros": ParamSpec((k // group, n // 8), torch.int32, 1, 8, 0, group),
                 "scales": ParamSpec((k // group, n), torch.float16, 1, 1, 0, group)}
        if shape.has_g_idx:
            specs["g_idx"] = ParamSpec((k,), torch.int32, input_dim=0)
        return specs
    raise ValueError(f"unknown linear scheme {scheme!r}; known: {', '.join(LINEAR_SCHEMES)}")
