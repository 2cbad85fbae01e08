"""The one tolerance table of the conformance suite, per dtype.

Error measure (what reports call "max error"): the worst-case error relative to the output's
magnitude, ``max |out - ref| / max |ref|``, with ``ref`` the float64 oracle evaluated on the
same (dtype-rounded) inputs. An output passes when that is at most the dtype's bound, and when
it has no NaN or infinity where the oracle has none (and the oracle's infinities exactly).

The bounds leave room for rounding the output and a few intermediates (softmax probabilities,
MoE activations) to the dtype, with fp32 accumulation; they do not leave room for computing
in a lower precision than the contract says (an fp16 ``x * x`` in RMSNorm overflows) or for
off-by-one masks. Exact contracts (KV writes, bitmask, greedy ids, top-k ids) use no tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """``max_rel_err``: the largest allowed ``max |out - ref| / max |ref|``."""

    max_rel_err: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(max_rel_err=2e-4),
    torch.float16: Tolerance(max_rel_err=4e-3),
    torch.bfloat16: Tolerance(max_rel_err=2e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The bound for outputs of ``dtype``. Raises ``ValueError`` for a dtype not in the table."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in TOLERANCES)
        raise ValueError(f"no conformance tolerance for {dtype} (table has {known})") from None
