"""The decoder and Gemma layers hand a backend that folds the qk-norm / rotary
(``AttentionBackend.forward_prologue``) the un-normed, un-rotated q / k with their own norm
weights (random here, Gemma's ``1 + w``), eps, rotary cache and style: decode logits through
a folding backend (the cpu backend with a fold composed of the cpu ops) equal those of the
ops-then-``forward`` path, and the fold is actually taken at decode."""

from __future__ import annotations

import pytest
import torch

from engine_harness import PagedSequence, cpu_args, decode, extend, randomise_qk_norms
from heteroserve.core.kernels.attention import AttentionPrologue, ForwardMode
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.platforms.cpu import qk_norm, rotary
from heteroserve.platforms.cpu.attention import TorchNativeAttention

PROMPT = [11, 57, 3, 200, 42, 9, 77, 301, 15, 64, 128, 5, 99]


def _decode_logits(path) -> torch.Tensor:
    _, _, runner = build_model_runner(cpu_args(path, disable_cuda_graph=True))
    seq = PagedSequence(runner, len(PROMPT) + 3)
    extend(runner, [(PROMPT, 0, seq)])
    return torch.stack([decode(runner, [(t, len(PROMPT) + i, seq)])[0]
                        for i, t in enumerate((7, 300))])


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "gemma2", "llama"])
@torch.no_grad()
def test_folding_backend_sees_the_layers_own_prologue(tmp_path, monkeypatch, arch) -> None:
    path = build_tiny_model(tmp_path / arch, arch, seed=5)
    randomise_qk_norms(path)
    plain = _decode_logits(path)

    folded: list[bool] = []

    def fold(self, q, k, v, k_cache, v_cache, layer, meta, prologue: AttentionPrologue):
        if meta.mode is not ForwardMode.DECODE:
            return None
        q, k = q.clone(), k.clone()
        if prologue.has_norm:
            q, k = qk_norm.qk_norm_rotary(q, k, prologue.q_norm_weight, prologue.k_norm_weight,
                                          prologue.eps, prologue.positions,
                                          prologue.cos_sin_cache, prologue.is_neox)
        else:
            q, k = rotary.apply_rotary(prologue.positions, q, k, prologue.cos_sin_cache,
                                       prologue.is_neox)
        folded.append(prologue.has_norm)
        return self.forward(q, k, v, k_cache, v_cache, layer, meta)

    monkeypatch.setattr(TorchNativeAttention, "forward_prologue", fold)
    through_fold = _decode_logits(path)
    assert folded, "decode never went through forward_prologue"
    assert all(folded) == (arch in ("qwen3", "gemma3"))
    torch.testing.assert_close(through_fold, plain, rtol=1e-5, atol=1e-5)
