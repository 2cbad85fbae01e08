"""The MLA layer hands its backend strided views of the projections only when the backend
says it takes them (``MLABackend.strided_inputs``, plugin API 1.1); a backend written against
1.0 keeps receiving dense tensors. Both give transformers' logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_harness import PagedSequence, cpu_args, decode, extend

from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.platforms.cpu.mla import TorchNativeMLA
from parity import rel_error as rel_err


class _Recording(TorchNativeMLA):
    """The torch-native MLA, recording whether each call's q/k inputs were dense."""

    def __init__(self, config, strided: bool) -> None:
        super().__init__(config)
        self.strided_inputs = strided
        self.dense: list[bool] = []

    def forward(self, q_nope, q_pe, latent, k_pe, cache, w_kc, w_vc, layer, meta):
        self.dense.append(all(t.is_contiguous() for t in (q_nope, q_pe, latent, k_pe)))
        return super().forward(q_nope, q_pe, latent, k_pe, cache, w_kc, w_vc, layer, meta)


@pytest.mark.parametrize("strided", [False, True])
def test_mla_inputs_follow_the_backend_declaration(tmp_path, strided: bool) -> None:
    path = build_tiny_model(tmp_path / "dsv2", "deepseek_v2", seed=5)
    _, _, runner = build_model_runner(cpu_args(path))
    backend = _Recording(runner.backend.config, strided)
    runner.backend = backend
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = [5, 17, 99, 3, 42]
    seq = PagedSequence(runner, len(prompt) + 3)
    ours = extend(runner, [(prompt, 0, seq)])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(2):
            token = int(ours.argmax())
            ours = decode(runner, [(token, len(ids), seq)])[0]
            ids.append(token)
            assert rel_err(ours, hf(torch.tensor([ids])).logits[0, -1]) < 1e-4
    assert backend.dense and (all(backend.dense) if not strided else not all(backend.dense))
