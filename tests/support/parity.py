"""Engine vs transformers, step by step: logits within a tolerance and the same greedy
tokens (transformers run incrementally with its KV cache, as the engine decodes)."""

from __future__ import annotations

import torch

from engine_harness import PagedSequence, decode, extend

PROMPT = [11, 57, 3, 200, 42, 9, 77, 301, 15, 64, 128, 5, 99]
STEPS = 10


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def assert_matches(runner, hf: torch.nn.Module, tol: float) -> None:
    """Prefill then ``STEPS`` greedy decode steps: every step's logits within ``tol``
    (relative to the largest) of transformers run incrementally with its KV cache, and
    the same greedy tokens."""
    seq = PagedSequence(runner, len(PROMPT) + STEPS + 1)
    ours = extend(runner, [(PROMPT, 0, seq)])[0]
    out = hf(torch.tensor([PROMPT]), use_cache=True)
    ref, past = out.logits[0, -1], out.past_key_values
    mine, theirs = [], []
    for step in range(STEPS):
        assert rel_error(ours, ref) < tol, f"step {step}: {rel_error(ours, ref):.2e}"
        mine.append(int(ours.argmax()))
        theirs.append(int(ref.argmax()))
        token = theirs[-1]
        ours = decode(runner, [(token, len(PROMPT) + step, seq)])[0]
        out = hf(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        ref, past = out.logits[0, -1], out.past_key_values
    assert mine == theirs


@torch.no_grad()
def assert_prompt_close(runner, hf: torch.nn.Module, tol: float) -> None:
    """The prefill's last logits within ``tol`` (relative to the largest) of transformers'
    (for references that only agree on the prompt, see the caller)."""
    seq = PagedSequence(runner, len(PROMPT) + 1)
    ours = extend(runner, [(PROMPT, 0, seq)])[0]
    ref = hf(torch.tensor([PROMPT])).logits[0, -1]
    assert rel_error(ours, ref) < tol, f"prompt logits: {rel_error(ours, ref):.2e}"
