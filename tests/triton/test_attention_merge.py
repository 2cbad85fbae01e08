"""``merge_attention_into`` (cuda's long-extend merge): attention over two disjoint key sets
from each set's output and log-sum-exp equals attention over their union, computed in
float64; strided inputs laid out as cuDNN returns them, head sizes that are not powers of
two, a set that holds no key for some rows, and the shape checks."""

from __future__ import annotations

import pytest
import torch

from heteroserve.platforms.triton.attention_merge import merge_attention_into


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """float64 ``(out [H, n, D], lse [H, n])`` of ``q [H, n, D]`` over ``k/v [H, L, D]``."""
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,heads,d", [(37, 4, 64), (5, 3, 80)])
def test_merge_equals_attention_over_both_sets(device, dtype, n: int, heads: int,
                                               d: int) -> None:
    gen = torch.Generator().manual_seed(n + d)
    q = torch.randn(heads, n, d, generator=gen)
    k, v = torch.randn(heads, 50, d, generator=gen), torch.randn(heads, 50, d, generator=gen)
    whole, _ = _attend(q, k, v)
    (o1, l1), (o2, l2) = _attend(q, k[:, :19], v[:, :19]), _attend(q, k[:, 19:], v[:, 19:])

    def as_cudnn(o: torch.Tensor) -> torch.Tensor:
        """``o [H, n, D]`` stored row-major as ``[n, H, D]`` (cuDNN's output follows q's
        layout), on the device in ``dtype``."""
        return o.transpose(0, 1).contiguous().to(device, dtype).transpose(0, 1)

    out = torch.full((n + 2, heads, d), float("nan"), dtype=dtype, device=device)
    merge_attention_into(out[1:n + 1], as_cudnn(o1), l1.float().to(device),
                         as_cudnn(o2), l2.float().t().contiguous().t().to(device))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[1:n + 1].double().cpu(), whole.transpose(0, 1),
                               atol=tol, rtol=tol)
    assert out[0].isnan().all() and out[n + 1].isnan().all()  # rows outside stay untouched


def test_a_set_without_keys_for_a_row_gives_the_other_sets_output(device) -> None:
    o1, o2 = torch.randn(2, 6, 32, device=device), torch.randn(2, 6, 32, device=device)
    l1, l2 = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    l1[:, 2] = float("-inf")
    out = merge_attention_into(torch.empty(6, 2, 32, device=device), o1, l1, o2, l2)
    torch.testing.assert_close(out[2], o2[:, 2], atol=1e-6, rtol=1e-6)


def test_mismatched_inputs_are_refused(device) -> None:
    o = torch.randn(2, 6, 32, device=device)
    lse = torch.randn(2, 6, device=device)
    with pytest.raises(ValueError, match="merge_attention_into"):
        merge_attention_into(torch.empty(6, 2, 16, device=device), o, lse, o, lse)
    with pytest.raises(ValueError, match="float32"):
        merge_attention_into(torch.empty(6, 2, 32, device=device), o, lse.double(), o, lse)
    with pytest.raises(ValueError, match="contiguous"):
        merge_attention_into(torch.empty(6, 2, 64, device=device)[..., ::2], o, lse, o, lse)
