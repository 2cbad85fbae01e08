"""Numerical bisection: which kernel makes a model's output on a platform go wrong.

1. Trace one prefill of a model on the platform under test and on the cpu reference (every
   op forced to ``torch_native``, float32): every kernel call's output, in call order, tagged
   with its decoder layer.
2. The first call whose output differs from the reference's by more than the dtype's
   conformance tolerance (``max |out - ref| / max |ref|``) is the first divergence.
3. Rerun the platform with one op at a time forced to ``torch_native`` (``--kernel``); the op
   whose swap makes every call agree is the kernel at fault.

The traced calls are the dispatch table's function ops, the attention backend's ``forward``
and every linear method's ``apply``; ``sampling`` and ``token_bitmask_apply`` do not run in a
forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from heteroserve.conformance.checks import rel_err
from heteroserve.conformance.tolerances import tolerance
from heteroserve.core.config import ServerArgs
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.kernels.dispatch import DispatchTable, wanted_ops
from heteroserve.core.layers.linear import LinearBase
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.build import build_model_runner

REFERENCE_PLATFORM = "cpu"
REFERENCE_IMPL = "torch_native"
#: a fixed prompt: long enough to cross pages and attention chunks, ids valid in any vocab
PROMPT_LEN = 40
TRACED_FUNCTION_OPS = tuple(op for op in ops.FUNCTION_OPS
                            if op not in (ops.SAMPLING, ops.TOKEN_BITMASK_APPLY))


@dataclass(frozen=True)
class OpCall:
    """One traced kernel call: ``op`` (registry op name), ``layer`` (decoder layer index, -1
    outside the layers), ``index`` (its position in the trace) and its first output tensor as
    float64 on the host."""

    index: int
    op: str
    layer: int
    output: torch.Tensor


@dataclass
class Trace:
    """A traced prefill: the calls, the final logits, and the implementation chosen per op."""

    calls: list[OpCall]
    logits: torch.Tensor
    chosen: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Divergence:
    """The first call beyond tolerance (or the logits, ``call is None``)."""

    call: OpCall | None
    err: float
    bound: float


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach().double().cpu()


class _Tracer:
    def __init__(self) -> None:
        self.calls: list[OpCall] = []
        self.layer = -1
        self.depth = 0

    def wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if self.depth == 0:  # a kernel calling another traced kernel records once
                self.calls.append(OpCall(len(self.calls), op, self.layer, _first_tensor(out)))
            return out

        return traced


def trace_prefill(model_dir: str, platform: str, dtype: str,
                  overrides: dict[str, str]) -> Trace:
    """Build a runner for ``platform`` (graphs off) and trace one prefill of a fixed prompt."""
    args = ServerArgs(model_path=model_dir, platform=platform, dtype=dtype,
                      kernel=[f"{k}={v}" for k, v in overrides.items()], max_total_tokens=512,
                      max_running_requests=1, disable_cuda_graph=True)
    _, dispatch, runner = build_model_runner(args)
    tracer = _Tracer()
    _instrument(dispatch, runner, tracer)
    ids = [(7 * i + 3) % runner.vocab_size for i in range(PROMPT_LEN)]
    pages = list(range(1, -(-PROMPT_LEN // runner.page_size) + 1))
    batch = build_forward_batch([SequenceInput(ids, 0, pages)], ForwardMode.EXTEND,
                                runner.page_size, runner.device)
    logits = runner.forward_eager(batch)
    runner.platform.synchronize(runner.device)
    chosen = {op: res.chosen.name for op, res in dispatch.resolutions.items()}
    return Trace(tracer.calls, logits.detach().double().cpu(), chosen)


def _instrument(dispatch: DispatchTable, runner: Any, tracer: _Tracer) -> None:
    for op in TRACED_FUNCTION_OPS:
        setattr(dispatch, op, tracer.wrap(op, getattr(dispatch, op)))
    backend = runner.backend
    backend.forward = tracer.wrap(ops.ATTENTION, backend.forward)
    for module in runner.model.modules():
        if isinstance(module, LinearBase):
            module.method.apply = tracer.wrap(ops.linear_op(dispatch.request.quant_scheme),
                                              module.method.apply)
    for i, layer in enumerate(runner.model.model.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: setattr(tracer, "layer", i))


def first_divergence(test: Trace, ref: Trace, dtype: torch.dtype) -> Divergence | None:
    """The first call of ``test`` beyond ``dtype``'s tolerance against ``ref`` (calls are
    matched by position and must be the same op), else the logits, else None."""
    bound = tolerance(dtype).max_rel_err
    for a, b in zip(test.calls, ref.calls):
        if a.op != b.op:
            raise ValueError(f"traces differ in structure at call {a.index}: {a.op} vs {b.op}")
        if a.output.shape != b.output.shape:
            return Divergence(a, float("inf"), bound)
        err = rel_err(a.output, b.output)
        if not err <= bound:
            return Divergence(a, err, bound)
    err = rel_err(test.logits, ref.logits)
    return None if err <= bound else Divergence(None, err, bound)


@dataclass
class BisectResult:
    """What ``heteroserve bisect`` found: the first divergence (None: none), and per swapped
    op whether forcing ``torch_native`` removed every divergence."""

    platform: str
    chosen: dict[str, str]
    divergence: Divergence | None
    swaps: dict[str, bool] = field(default_factory=dict)

    @property
    def culprits(self) -> list[str]:
        """``OP=IMPL`` of each op whose swap alone fixed the divergence."""
        return [f"{op}={self.chosen[op]}" for op, fixed in self.swaps.items() if fixed]


def bisect(model_dir: str, platform: str, dtype: str = "float32",
           overrides: dict[str, str] | None = None) -> BisectResult:
    """Run the three steps of the module docstring; ``overrides`` are ``--kernel`` choices
    for the platform under test."""
    overrides = dict(overrides or {})
    reference = trace_prefill(model_dir, REFERENCE_PLATFORM, "float32",
                              {op: REFERENCE_IMPL for op in wanted_ops()})
    test = trace_prefill(model_dir, platform, dtype, overrides)
    torch_dtype = getattr(torch, dtype)
    result = BisectResult(platform, test.chosen, first_divergence(test, reference, torch_dtype))
    if result.divergence is None:
        return result
    for op, impl in sorted(test.chosen.items()):
        if impl == REFERENCE_IMPL or op in overrides:
            continue
        swapped = trace_prefill(model_dir, platform, dtype, {**overrides, op: REFERENCE_IMPL})
        result.swaps[op] = first_divergence(swapped, reference, torch_dtype) is None
    return result


def describe(result: BisectResult) -> list[str]:
    """The report ``heteroserve bisect`` prints, one finding per line."""
    d = result.divergence
    if d is None:
        return [f"{result.platform}: every traced kernel call agrees with the cpu reference "
                f"(torch_native, float32) within tolerance"]
    where = "the logits" if d.call is None else \
        f"call {d.call.index} ({d.call.op}, layer {d.call.layer})"
    lines = [f"{result.platform}: first divergence at {where}: max rel. error {d.err:.3g} > "
             f"{d.bound:g}"]
    for op, fixed in result.swaps.items():
        lines.append(f"  --kernel {op}={REFERENCE_IMPL}: "
                     + ("agrees with the reference" if fixed else "still diverges"))
    culprits = result.culprits
    lines.append("kernel at fault: " + (", ".join(culprits) if culprits else
                                        "none alone (no single swap removes the divergence)"))
    return lines
