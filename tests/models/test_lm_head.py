"""The LM head runs through the platform's unquantized linear method where it says so
(``serves_lm_head``): on cpu a oneDNN-packed weight, tied or not, logits as a plain product."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from engine_harness import cpu_args
from heteroserve.core.layers.embedding import ParallelLMHead
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.platforms.cpu.features import detect_cpu_features
from heteroserve.platforms.cpu.linear import UnquantizedLinear


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # untied, tied
def checkpoint(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=3)
    tensors = load_file(str(next(path.glob("*.safetensors"))))
    return path, tensors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lm_head_packed_and_equal_to_the_plain_product(checkpoint, dtype: str) -> None:
    path, tensors = checkpoint
    _, _, runner = build_model_runner(dataclasses.replace(cpu_args(path), dtype=dtype))
    model = runner.model
    head, embed = model.lm_head, model.model.embed_tokens
    torch_dtype = getattr(torch, dtype)
    tied = "lm_head.weight" not in tensors
    plain = tensors["model.embed_tokens.weight" if tied else "lm_head.weight"].to(torch_dtype)
    assert head.method is not None
    assert head.weight.is_mkldnn == (torch_dtype in detect_cpu_features().prepack_dtypes())
    # the embedding keeps a plain table for lookups, tied or not
    assert not embed.weight.is_mkldnn
    torch.testing.assert_close(embed(torch.tensor([0, 5, 7])),
                               tensors["model.embed_tokens.weight"].to(torch_dtype)[[0, 5, 7]])
    hidden = torch.randn(3, plain.shape[1]).to(torch_dtype)
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (3, model.config.vocab_size)
    ref = (hidden @ plain.t()).float()
    if torch_dtype == torch.float32:
        torch.testing.assert_close(logits, ref)
    else:  # one bf16 rounding of an fp32 accumulation on either side
        torch.testing.assert_close(logits, ref, atol=0.02, rtol=1e-2)


class _PlainLinear(UnquantizedLinear):
    serves_lm_head = False


def test_lm_head_stays_a_plain_matmul_where_the_method_declines(checkpoint) -> None:
    path, _ = checkpoint
    _, _, runner = build_model_runner(cpu_args(path))
    ctx = runner.model.lm_head.ctx
    ctx2 = dataclasses.replace(ctx, dispatch=dataclasses.replace(
        ctx.dispatch, linear={**ctx.dispatch.linear, "unquantized": _PlainLinear}))
    head = ParallelLMHead(ctx2, 40, 16)
    head.weight.data.copy_(torch.randn(40, 16))
    head.process_weights_after_loading()
    assert head.method is None and not head.weight.is_mkldnn
    x = torch.randn(2, 16)
    torch.testing.assert_close(head.logits(x), x @ head.weight.t())
