"""Every decoder layer of a built model holds the one cos/sin cache its rotary parameters
call for (not a copy per layer: 64 MiB a layer at Llama-3.1's 131,072 positions)."""

from __future__ import annotations

from engine_harness import cpu_args
from heteroserve.core.layers.rotary import RotaryEmbedding
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model


def _caches(model) -> list:
    return [m.cos_sin_cache for m in model.modules() if isinstance(m, RotaryEmbedding)]


def test_layers_share_the_cos_sin_cache(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "llama", "llama", seed=1)
    _, _, runner = build_model_runner(cpu_args(path))
    caches = _caches(runner.model)
    assert len(caches) == runner.model.config.num_layers >= 2
    assert all(c is caches[0] for c in caches)
    # a second engine of the same model while the first lives: the same tensor again
    _, _, other = build_model_runner(cpu_args(path))
    assert _caches(other.model)[0] is caches[0]


def test_gemma_local_and_global_layers_keep_their_own_caches(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "gemma3", "gemma3", seed=1)
    _, _, runner = build_model_runner(cpu_args(path))
    distinct = {id(c) for c in _caches(runner.model)}
    assert len(distinct) == 2  # the sliding layers' rope base and the global layers'
