"""Each architecture, built small with random weights, against transformers in fp32."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine_harness import PagedSequence, cpu_args, decode, extend, run_scheduler
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import ARCHITECTURES, build_tiny_model

PROMPT = [11, 57, 3, 200, 42, 9, 77, 301, 15, 64, 128, 5, 99]
REL_TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    _, _, runner = build_model_runner(cpu_args(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, runner, hf


@torch.no_grad()
def test_prefill_and_16_decode_steps_match_transformers(model) -> None:
    arch, _, runner, hf = model
    seq = PagedSequence(runner, len(PROMPT) + 17)
    ours = extend(runner, [(PROMPT, 0, seq)])[0]
    ids = list(PROMPT)
    ref_all = hf(torch.tensor([ids])).logits[0, -1]
    assert _rel(ours, ref_all) < REL_TOL, arch
    for _ in range(16):
        token = int(ref_all.argmax())
        ours = decode(runner, [(token, len(ids), seq)])[0]
        ids.append(token)
        ref_all = hf(torch.tensor([ids])).logits[0, -1]
        assert _rel(ours, ref_all) < REL_TOL, f"{arch} decode step {len(ids) - len(PROMPT)}"


@torch.no_grad()
def test_greedy_32_tokens_identical_to_hf_generate(model) -> None:
    arch, _, runner, hf = model
    seq = PagedSequence(runner, len(PROMPT) + 33)
    logits = extend(runner, [(PROMPT, 0, seq)])[0]
    out = []
    for _ in range(32):
        out.append(int(logits.argmax()))
        logits = decode(runner, [(out[-1], len(PROMPT) + len(out) - 1, seq)])[0]
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32,
                      do_sample=False)[0, len(PROMPT):].tolist()
    assert out == ref, arch


@torch.no_grad()
def test_chunked_prefill_and_ragged_batch_equal_single(model) -> None:
    arch, _, runner, _ = model
    whole = extend(runner, [(PROMPT, 0, PagedSequence(runner, len(PROMPT)))])[0]
    seq = PagedSequence(runner, len(PROMPT))
    for start, stop in ((0, 4), (4, 9), (9, len(PROMPT))):
        chunk = extend(runner, [(PROMPT[start:stop], start, seq)])[0]
    assert _rel(chunk, whole) < REL_TOL
    prompts = [PROMPT, PROMPT[:1], PROMPT[3:10]]
    alone = [extend(runner, [(p, 0, PagedSequence(runner, len(p)))])[0] for p in prompts]
    seqs = [PagedSequence(runner, len(p) + 1) for p in prompts]
    batched = extend(runner, [(p, 0, s) for p, s in zip(prompts, seqs)])
    for i in range(3):
        assert _rel(batched[i], alone[i]) < REL_TOL, f"{arch} row {i}"
    tokens = [int(r.argmax()) for r in batched]
    stepped = decode(runner, [(t, len(p), s) for t, p, s in zip(tokens, prompts, seqs)])
    for i, (t, p) in enumerate(zip(tokens, prompts)):
        s = PagedSequence(runner, len(p) + 1)
        extend(runner, [(p, 0, s)])
        single = decode(runner, [(t, len(p), s)])[0]
        assert _rel(stepped[i], single) < REL_TOL


@torch.no_grad()
def test_scheduler_radix_and_chunked_prefill_equal_hf_generate(model) -> None:
    """Shared-prefix requests batched through the scheduler, with 8-token prefill chunks
    and radix hits on the second pass, generate what transformers generates alone."""
    arch, path, _, hf = model
    prefix = PROMPT + PROMPT[::-1]
    prompts = [prefix + [7, 8, 9], prefix + [21], prefix[:9]]
    args = cpu_args(path, chunked_prefill_size=8, page_size=4)
    _, _, runner = build_model_runner(args)
    first, _ = run_scheduler(args, prompts, runner=runner, max_new_tokens=6)
    again, sched = run_scheduler(args, prompts, runner=runner, max_new_tokens=6)
    assert sched.get_stats()["cache_hit_rate"] > 0
    for i, ids in enumerate(prompts):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)[0, len(ids):].tolist()
        assert first[f"r{i}"] == ref and again[f"r{i}"] == ref, f"{arch} request {i}"


@torch.no_grad()
@pytest.mark.parametrize("scaling", [2.0, 1.0])
def test_deepseek_v2_greedy_routing_matches_transformers(tmp_path, scaling: float) -> None:
    """``topk_method: greedy`` (V2-Lite's routing: one group, through the top-k softmax op).
    At V2-Lite's ``routed_scaling_factor`` 1.0 the op appends the shared-expert slots; with a
    factor (applied after the op) one concatenation does."""
    path = build_tiny_model(tmp_path, "deepseek_v2", seed=2, topk_method="greedy",
                            routed_scaling_factor=scaling)
    _, _, runner = build_model_runner(cpu_args(path))
    assert runner.model.model.layers[1].mlp.slots_in_op() == (scaling == 1.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = extend(runner, [(PROMPT, 0, PagedSequence(runner, len(PROMPT)))])[0]
    assert _rel(ours, hf(torch.tensor([PROMPT])).logits[0, -1]) < REL_TOL


@torch.no_grad()
def test_multimodal_gemma3_checkpoint_serves_its_text_model(tmp_path) -> None:
    """``Gemma3ForConditionalGeneration`` (Gemma 3 4B+ checkpoints): text-only logits equal
    transformers' multimodal model given token ids alone."""
    text = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 64, "sliding_window": 8, "query_pre_attn_scalar": 48,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "eos_token_id": 0, "bos_token_id": None, "pad_token_id": None}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.1)
    hf.save_pretrained(tmp_path)
    _, _, runner = build_model_runner(cpu_args(tmp_path))
    ours = extend(runner, [(PROMPT, 0, PagedSequence(runner, len(PROMPT)))])[0]
    assert _rel(ours, hf(input_ids=torch.tensor([PROMPT])).logits[0, -1]) < REL_TOL
