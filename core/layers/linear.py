"""Linear layers whose weights a :class:`~heteroserve.core.kernels.linear.LinearMethod` owns.

Tensor parallelism follows Megatron: column-parallel layers split output features across
ranks (no communication), row-parallel layers split input features and all-reduce their
output. Checkpoint tensors are full-size; the layer places each one (or this rank's slice)
where its :class:`~heteroserve.core.kernels.linear.ParamSpec` says the output and input
features lie, so fused q/k/v and gate/up shards and TP slices work for packed and
block-scaled layouts alike.

Which scheme holds a layer comes from the checkpoint's quantization format
(``ctx.quant``), asked by the Hugging Face names of the layer's sources (``q_proj``,
``k_proj``, ``v_proj`` for a fused qkv); the format's converter turns its tensors into the
scheme's (:mod:`heteroserve.core.quantization`).
"""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.linear import LinearShape, ParamSpec, checkpoint_specs
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.quantization.base import LayerQuant, QuantizationError
from heteroserve.core.quantization.fp8 import quantize_per_tensor, requantize_to_common_scale

Shard = int | str | None
_PACKED_DTYPES = (torch.int8, torch.int32, torch.uint8, torch.float8_e4m3fn,
                  torch.float8_e4m3fnuz, torch.float8_e5m2)


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {parts}")
    return n // parts


class LinearBase(nn.Module):
    """Holds the method's parameters for a ``[in_per_rank] -> [out_per_rank]`` projection.

    ``prefix``: the checkpoint module name; ``sources`` maps each shard id of a fused layer
    to its checkpoint module name (default ``{None: prefix}``). :meth:`load` takes one
    checkpoint tensor by its suffix (``weight``, ``weight_scale``, ``qweight``, ...);
    :meth:`check_loaded` names any tensor the checkpoint did not provide.
    """

    tp_dim: int | None = None  # 0: split outputs (column), 1: split inputs (row), None: replicated

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None, prefix: str = "",
                 sources: dict[Shard, str] | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.input_size, self.output_size = input_size, output_size
        self.prefix = prefix
        self.sources: dict[Shard, str] = sources or {None: prefix}
        self.quant = self._layer_quant(scheme)
        if self.quant.has_g_idx and self.tp_dim == 1 and ctx.tp_size > 1:
            raise QuantizationError(f"{prefix}: act-order g_idx with a row-parallel split "
                                    f"(--tp-size {ctx.tp_size}) is not supported")
        self.method = ctx.dispatch.linear[self.quant.scheme]()
        shape = LinearShape(input_size, output_size, ctx.dtype, self.quant.group_size,
                            self.quant.has_g_idx)
        self.param_specs: dict[str, ParamSpec] = (
            checkpoint_specs("unquantized", shape) if self.quant.online
            else self.method.create_weights(shape))
        for name, spec in self.param_specs.items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device=ctx.device),
                                 requires_grad=False)
            self.register_parameter(name, param)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=ctx.dtype, device=ctx.device),
                                 requires_grad=False) if bias else None
        self._loaded: set[tuple[str, Shard]] = set()
        self._received: dict[Shard, list[str]] = {}
        self._shard_scales: dict[Shard, torch.Tensor] = {}

    def _layer_quant(self, scheme: str | None) -> LayerQuant:
        if scheme is not None or self.ctx.quant is None:
            return LayerQuant(scheme or self.ctx.quant_scheme)
        per_source = {sid: self.ctx.quant.layer_quant(name) for sid, name in self.sources.items()}
        first = next(iter(per_source.values()))
        if any(q.key() != first.key() for q in per_source.values()):
            what = ", ".join(f"{self.sources[s]}: {q.label}" for s, q in per_source.items())
            raise QuantizationError(f"{self.prefix}: fused shards are quantized differently "
                                    f"({what})")
        return first

    def process_weights_after_loading(self) -> None:
        if self.quant.online:
            weight, scale = quantize_per_tensor(self.weight.data)
            self._replace("weight", weight)
            self._replace("weight_scale", scale)
        elif len(self._shard_scales) > 1:
            ids = list(self.sources)
            rows = [self._shard_layout(s)[:2] for s in ids]
            common = requantize_to_common_scale(self.weight.data,
                                                [self._shard_scales[s] for s in ids], rows)
            self.weight_scale.data.copy_(common)
        self.method.process_weights_after_loading(self)

    def _replace(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._parameters:
            delattr(self, name)
        self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    # -- loading -----------------------------------------------------------------------------
    def _shard_layout(self, shard: Shard) -> tuple[int, int, int, int]:
        """``(first output row on this rank, rows, rank of the checkpoint slice, rows of the
        whole checkpoint tensor)`` of ``shard``."""
        if self.tp_dim == 0:
            return 0, self.output_size, self.ctx.tp_rank, self.output_size * self.ctx.tp_size
        return 0, self.output_size, 0, self.output_size

    def _checkpoint_shape(self, shard: Shard) -> tuple[int, int]:
        """``[N, K]`` of the checkpoint layer behind ``shard`` (all ranks)."""
        k = self.input_size * (self.ctx.tp_size if self.tp_dim == 1 else 1)
        return self._shard_layout(shard)[3], k

    def load(self, name: str, tensor: torch.Tensor, shard: Shard = None) -> None:
        """Place checkpoint tensor ``<source>.<name>`` (this rank's part of it). Raises
        ``ValueError`` naming the parameter when the tensor does not fit the scheme."""
        if shard not in self.sources:
            raise ValueError(f"{type(self).__name__} has no shard {shard!r}")
        self._received.setdefault(shard, []).append(name)
        if name == "bias":
            if self.bias is None:
                raise ValueError(f"{type(self).__name__} has no bias")
            self._place("bias", tensor, shard, ParamSpec(tuple(self.bias.shape), self.bias.dtype,
                                                        output_dim=0))
            return
        converted = ([(name, tensor)] if self.quant.online
                     else self.quant.convert(name, tensor, self._checkpoint_shape(shard)))
        for pname, part in converted:
            spec = self.param_specs.get(pname)
            if spec is None:
                raise ValueError(f"the {self.quant.label} layout has no tensor {pname!r} "
                                 f"(expected {', '.join(self.param_specs)})")
            self._place(pname, part, shard, spec)
            self._loaded.add((pname, shard))

    def _place(self, name: str, tensor: torch.Tensor, shard: Shard, spec: ParamSpec) -> None:
        param = getattr(self, name)
        if param.dtype in _PACKED_DTYPES and tensor.dtype != param.dtype:
            raise ValueError(f"{name} is {tensor.dtype} in the checkpoint, the "
                             f"{self.quant.scheme} scheme stores {param.dtype}")
        start, size, src, whole = self._shard_layout(shard)
        dest = param.data
        split_out = shard is not None or whole != size
        if spec.output_dim is not None and split_out:
            d, pack = spec.output_dim, spec.output_pack
            # the last shard of an unsplit layer may end inside a pack (fp8 block scales of
            # 576 rows: 5 block rows), which then covers the layer's last rows alone
            tail = whole == size and start + size == self.output_size
            count = -(-size // pack) if tail else size // pack
            if start % pack or (size % pack and not tail):
                raise ValueError(f"{name}: {size} output features at row {start} do not align "
                                 f"with its packing of {pack}")
            if tensor.shape[d] != (count if tail else whole // pack):
                raise ValueError(f"{name}: checkpoint dim {d} is {tensor.shape[d]}, expected "
                                 f"{count if tail else whole // pack}")
            tensor = tensor.narrow(d, src * count, count)
            dest = dest.narrow(d, start // pack, count)
        elif spec.output_dim is None and spec.input_dim is None and shard is not None:
            self._shard_scales[shard] = tensor.reshape(1).to(torch.float32)
        if spec.input_dim is not None and self.tp_dim == 1 and self.ctx.tp_size > 1:
            d, per = spec.input_dim, param.shape[spec.input_dim]
            if tensor.shape[d] != per * self.ctx.tp_size:
                raise ValueError(f"{name}: checkpoint dim {d} is {tensor.shape[d]}, expected "
                                 f"{per * self.ctx.tp_size} to split over {self.ctx.tp_size} ranks")
            tensor = tensor.narrow(d, self.ctx.tp_rank * per, per)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"{name}: checkpoint shape {list(tensor.shape)} does not match "
                             f"{list(dest.shape)}")
        shared = spec.output_dim is None and spec.input_dim is not None  # e.g. g_idx
        if shared and any(n == name for n, _ in self._loaded):
            if not torch.equal(dest, tensor.to(dest.dtype)):
                raise ValueError(f"{name} differs between the fused shards of {self.prefix}; "
                                 "they share one input and must share it")
            return
        dest.copy_(tensor.to(dest.dtype))

    def check_loaded(self) -> None:
        """Raise :class:`QuantizationError` naming the first scheme tensor no checkpoint
        tensor provided (e.g. a missing ``weight_scale``)."""
        for shard, source in self.sources.items():
            for pname in self.param_specs:
                if (pname, shard) not in self._loaded:
                    got = ", ".join(self._received.get(shard, [])) or "nothing"
                    raise QuantizationError(
                        f"checkpoint tensor for {source}.{pname} is missing ({self.quant.label} "
                        f"layout; the checkpoint has {got} for {source})")


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer (routers, small projections)."""

    def forward_upcast(self, x: torch.Tensor) -> torch.Tensor:
        """This projection of ``x`` in a narrower float dtype than the layer's (an fp32
        router fed the model's bf16 activations): ``self(x.to(layer dtype))``, in one kernel
        where the method reads ``x`` as it is (:meth:`LinearMethod.apply_upcast`)."""
        if x.dtype != self.ctx.dtype:
            fused = self.method.apply_upcast(self, x, self.bias)
            if fused is not None:
                return fused
            x = x.to(self.ctx.dtype)
        return self(x)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; ``forward`` returns this rank's slice."""

    tp_dim = 0

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None, prefix: str = "",
                 sources: dict[Shard, str] | None = None) -> None:
        super().__init__(ctx, input_size, _divide(output_size, ctx.tp_size, "output size"),
                         bias, scheme, prefix, sources)

    def forward_rms_norm(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm`` then this projection: returns ``(self(norm(h)), h)`` with ``h = x +
        residual`` (``h = x`` without one), in one kernel where the method fuses the pair
        (:meth:`LinearMethod.apply_rms_norm`), else through ``norm`` (which may update ``x``
        and ``residual`` in place, as :class:`RMSNorm` does)."""
        fused = self.method.apply_rms_norm(self, x, residual, norm.weight, norm.eps, self.bias)
        if fused is not None:
            return fused
        if residual is None:
            return self(norm(x)), x
        normed, h = norm(x, residual)
        return self(normed), h


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the output is all-reduced (bias added once)."""

    tp_dim = 1

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None, prefix: str = "") -> None:
        super().__init__(ctx, _divide(input_size, ctx.tp_size, "input size"), output_size,
                         bias, scheme, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.ctx.all_reduce(self.method.apply(self, x, None))
        return out if self.bias is None else out + self.bias

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``self(silu_and_mul(x))`` for ``x [T, 2 * input_size]`` = ``[gate | up]``, in one
        kernel where the method fuses the pair (:meth:`LinearMethod.apply_silu_and_mul`)."""
        bias = self.bias if self.ctx.tp_size == 1 else None
        out = self.method.apply_silu_and_mul(self, x, bias)
        if out is None:
            out = self.method.apply(self, self.ctx.dispatch.silu_and_mul(x), bias)
        if self.ctx.tp_size == 1:
            return out
        out = self.ctx.all_reduce(out)
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused along outputs (gate and up). Shard ``i`` of
    the checkpoint fills rows ``sum(sizes[:i]) : sum(sizes[:i+1])`` of this rank's weight.
    ``source_names[i]`` is shard ``i``'s checkpoint module name."""

    def __init__(self, ctx: LayerContext, input_size: int, output_sizes: list[int],
                 bias: bool, scheme: str | None = None,
                 source_names: list[str] | None = None) -> None:
        self.shard_sizes = [_divide(s, ctx.tp_size, "output size") for s in output_sizes]
        names = source_names or [""] * len(output_sizes)
        prefix = ",".join(names)
        super().__init__(ctx, input_size, sum(output_sizes), bias, scheme, prefix,
                         dict(enumerate(names)))

    def fused_gated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """``act(gate) * up`` of this projection of ``x`` in one kernel, for a projection of
        two equal shards ``[gate | up]`` whose linear method fuses the activation for this
        input (:meth:`LinearMethod.apply_gated`); None otherwise (the caller runs the
        projection, then the activation op, or a fused form of those)."""
        if len(self.shard_sizes) != 2 or self.shard_sizes[0] != self.shard_sizes[1]:
            return None
        return self.method.apply_gated(self, x, activation, self.bias)

    def _shard_layout(self, shard: Shard) -> tuple[int, int, int, int]:
        if shard is None:
            return super()._shard_layout(shard)
        index = int(shard)
        size = self.shard_sizes[index]
        return sum(self.shard_sizes[:index]), size, self.ctx.tp_rank, size * self.ctx.tp_size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; query heads split across ranks, KV heads split too or
    replicated when there are fewer KV heads than ranks. ``source_names`` are the q, k and v
    checkpoint module names."""

    def __init__(self, ctx: LayerContext, hidden_size: int, head_size: int, num_heads: int,
                 num_kv_heads: int, bias: bool, scheme: str | None = None,
                 source_names: tuple[str, str, str] = ("", "", "")) -> None:
        tp = ctx.tp_size
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        self.total_num_kv_heads = num_kv_heads
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_rank = ctx.tp_rank
        else:
            if tp % num_kv_heads:
                raise ValueError(f"tensor-parallel size {tp} is not a multiple of "
                                 f"num_key_value_heads={num_kv_heads}")
            self.num_kv_heads = 1
            self.kv_rank = ctx.tp_rank // (tp // num_kv_heads)
        self.head_size = head_size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size
        LinearBase.__init__(self, ctx, hidden_size, out, bias, scheme, ",".join(source_names),
                            dict(zip("qkv", source_names)))

    def _shard_layout(self, shard: Shard) -> tuple[int, int, int, int]:
        if shard is None:
            return super()._shard_layout(shard)
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard == "q":
            return 0, q, self.ctx.tp_rank, q * self.ctx.tp_size
        whole_kv = self.total_num_kv_heads * self.head_size
        return (q if shard == "k" else q + kv), kv, self.kv_rank, whole_kv


class MergedReplicatedLinear(ReplicatedLinear):
    """Replicated projections of one input fused along outputs (DeepSeek's ``q_a_proj`` and
    ``kv_a_proj_with_mqa``): shard ``i`` fills rows ``sum(sizes[:i]) : sum(sizes[:i+1])``;
    ``source_names[i]`` is its checkpoint module name. :meth:`refusal` says whether a
    merge keeps every shard's result exactly what its own layer computes."""

    def __init__(self, ctx: LayerContext, input_size: int, output_sizes: list[int],
                 bias: bool, source_names: list[str]) -> None:
        self.shard_sizes = list(output_sizes)
        super().__init__(ctx, input_size, sum(output_sizes), bias, None,
                         ",".join(source_names), dict(enumerate(source_names)))

    def _shard_layout(self, shard: Shard) -> tuple[int, int, int, int]:
        if shard is None:
            return super()._shard_layout(shard)
        index = int(shard)
        size = self.shard_sizes[index]
        return sum(self.shard_sizes[:index]), size, 0, size

    @staticmethod
    def refusal(ctx: LayerContext, input_size: int, output_sizes: list[int],
                source_names: list[str]) -> str | None:
        """None when the named layers can merge: the checkpoint stores them alike, the
        scheme has no tensor-wide scale (one per-tensor scale would be shared, rounding one
        shard's weights again) and is not quantized online, and every shard but the last
        starts and ends on the packing of each output-indexed tensor (128-row fp8 blocks:
        the blocks stay those of the separate layers). Else the reason, one line."""
        quants = [ctx.quant.layer_quant(n) if ctx.quant is not None
                  else LayerQuant(ctx.quant_scheme) for n in source_names]
        first = quants[0]
        if any(q.key() != first.key() for q in quants):
            return "stored differently (" + ", ".join(
                f"{n.rpartition('.')[2]}: {q.label}" for n, q in zip(source_names, quants)) + ")"
        if first.online:
            return f"{first.label} is quantized at load with one scale per tensor"
        if first.has_g_idx:
            return "act-order g_idx is each layer's own"
        shape = LinearShape(input_size, sum(output_sizes), ctx.dtype, first.group_size,
                            first.has_g_idx)
        specs = ctx.dispatch.linear[first.scheme]().create_weights(shape)
        for pname, spec in specs.items():
            if spec.output_dim is None and spec.input_dim is None:
                return f"{first.scheme} has a tensor-wide {pname}"
            edges = [sum(output_sizes[:i + 1]) for i in range(len(output_sizes) - 1)]
            if spec.output_dim is not None and any(e % spec.output_pack for e in edges):
                return (f"{first.scheme} {pname} packs {spec.output_pack} rows; shards of "
                        f"{output_sizes} split a pack")
        return None
