"""The official ``openai`` client against ``heteroserve serve``: chat and completions, plain
and streaming, sync and async, n, stop, logprobs, seed, token limits, and vLLM's extensions
(``min_tokens``, ``continue_final_message``, ``structured_outputs``...).

References: greedy token ids from transformers' own model (``hf_greedy``), the tokenizer's
decode, and the server's other routes (plain vs streaming, sync vs async must agree).
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from server_harness import API_KEY, MODEL_NAME, ServerProcess

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=60.0, http_client=httpx.Client(trust_env=False))
    yield client
    client.close()


@pytest.fixture(scope="module")
def greedy_completion(oai):
    """The plain greedy completion of PROMPT, 12 tokens."""
    return oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                  extra_body=NO_EOS, **GREEDY)


def test_models_list(oai) -> None:
    assert [m.id for m in oai.models.list().data] == [MODEL_NAME]


def test_completion_matches_transformers(greedy_completion, tokenizer, hf_greedy) -> None:
    ids = tokenizer.encode(PROMPT)
    expected = tokenizer.decode(hf_greedy(ids, 12))
    choice = greedy_completion.choices[0]
    assert choice.text == expected
    assert choice.finish_reason == "length"
    usage = greedy_completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 12)
    assert usage.total_tokens == len(ids) + 12
    assert greedy_completion.model == MODEL_NAME
    assert greedy_completion.id.startswith("cmpl-")


def test_completion_stream_equals_plain(oai, greedy_completion) -> None:
    chunks = list(oai.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy_completion.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_chat_plain_and_stream(oai, tokenizer, hf_greedy) -> None:
    plain = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10,
                                        extra_body=NO_EOS, **GREEDY)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES),
                                  add_special_tokens=False)
    content = plain.choices[0].message.content
    assert content == tokenizer.decode(hf_greedy(prompt_ids, 10))
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.completion_tokens == 10
    stream = list(oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                              max_tokens=10, stream=True, extra_body=NO_EOS,
                                              **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == content
    assert stream[-1].choices[0].finish_reason == "length"


def test_async_client_matches_sync(server, oai, greedy_completion) -> None:
    sync_chat = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=6,
                                            extra_body=NO_EOS, **GREEDY)

    async def main() -> tuple:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                    timeout=60.0, http_client=httpx.AsyncClient(trust_env=False))
        async with client:
            async def stream_chat() -> str:
                out = await client.chat.completions.create(
                    model=MODEL_NAME, messages=MESSAGES, max_tokens=6, stream=True,
                    extra_body=NO_EOS, **GREEDY)
                return "".join([c.choices[0].delta.content or "" async for c in out])

            async def stream_completion() -> str:
                out = await client.completions.create(
                    model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stream=True,
                    extra_body=NO_EOS, **GREEDY)
                return "".join([c.choices[0].text async for c in out])

            return await asyncio.gather(
                client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                          extra_body=NO_EOS, **GREEDY),
                client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                               max_tokens=6, extra_body=NO_EOS, **GREEDY),
                stream_completion(), stream_chat())

    completion, chat, streamed_completion, streamed_chat = asyncio.run(main())
    assert completion.choices[0].text == greedy_completion.choices[0].text
    assert streamed_completion == greedy_completion.choices[0].text
    assert chat.choices[0].message.content == sync_chat.choices[0].message.content
    assert streamed_chat == sync_chat.choices[0].message.content


def test_n_choices_and_seed_reproducible(oai) -> None:
    def ask():
        return oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, n=3,
                                      temperature=1.0, seed=1234, extra_body=NO_EOS)

    first, second = ask(), ask()
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert first.usage.completion_tokens == 24
    assert ([c.text for c in sorted(first.choices, key=lambda c: c.index)]
            == [c.text for c in sorted(second.choices, key=lambda c: c.index)])
    stream = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                         n=2, stream=True, extra_body=NO_EOS, **GREEDY)
    finished = {c.choices[0].index for c in stream if c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_multiple_prompts(oai, greedy_completion) -> None:
    out = oai.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Hello"], max_tokens=12,
                                 n=2, extra_body=NO_EOS, **GREEDY)
    by_index = {c.index: c.text for c in out.choices}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0] == by_index[1] == greedy_completion.choices[0].text


def test_stop_string(oai, greedy_completion) -> None:
    full = greedy_completion.choices[0].text
    candidates = [full[i:i + 2] for i in range(3, len(full) - 2)
                  if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]]
    if not candidates:
        pytest.skip(f"greedy text {full!r} has no usable stop string")
    stop = candidates[0]
    out = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stop=[stop],
                                 extra_body=NO_EOS, **GREEDY)
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_completion_logprobs(oai, greedy_completion, tokenizer) -> None:
    out = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, logprobs=3,
                                 extra_body=NO_EOS, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    special = set(tokenizer.hf.all_special_tokens)  # in logprobs, skipped in the text
    assert "".join(t for t in lp.tokens if t not in special) == greedy_completion.choices[0].text
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0.0
        assert 1 <= len(top) <= 3
        assert token_lp == pytest.approx(max(top.values()), abs=1e-4)  # greedy = argmax
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]


def test_chat_logprobs(oai) -> None:
    out = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=5,
                                      logprobs=True, top_logprobs=3, extra_body=NO_EOS, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_max_completion_tokens_and_extensions(oai) -> None:
    out = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                      max_completion_tokens=5, extra_body=NO_EOS, **GREEDY)
    assert out.usage.completion_tokens == 5
    greedy = out.choices[0].message.content
    top_k_1 = oai.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, temperature=1.0,
        seed=7, extra_body={**NO_EOS, "top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0})
    assert top_k_1.choices[0].message.content == greedy  # top-k 1 sampling is greedy
    out = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, top_p=0.9,
                                 frequency_penalty=0.5, presence_penalty=0.5, temperature=0.7,
                                 extra_body={"stop_token_ids": [1], "min_p": 0.05})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_min_tokens_holds_back_eos_and_stop_strings(oai, tokenizer) -> None:
    """vLLM's ``min_tokens``: an EOS the logit bias makes certain comes only after that many
    tokens, and a stop string only matches from then on (plain and streamed agree)."""
    eos = min(tokenizer.eos_token_ids)
    for min_tokens, completion_tokens in ((0, 1), (5, 6)):
        out = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                     logit_bias={str(eos): 100}, **GREEDY,
                                     extra_body={"min_tokens": min_tokens})
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == completion_tokens
    word = next(t for t in range(tokenizer.vocab_size) if t != eos
                and tokenizer.decode([t]).isalpha() and tokenizer.decode([t, t]) ==
                2 * tokenizer.decode([t]))
    text = tokenizer.decode([word])
    for min_tokens in (0, 3):
        kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, stop=[text], **GREEDY,
                      logit_bias={str(word): 100}, extra_body={**NO_EOS, "min_tokens": min_tokens})
        plain = oai.completions.create(**kwargs)
        streamed = "".join(c.choices[0].text for c in oai.completions.create(**kwargs, stream=True)
                           if c.choices)
        assert plain.choices[0].finish_reason == "stop"
        assert plain.choices[0].text == streamed == text * max(0, min_tokens - 1)
    with pytest.raises(openai.BadRequestError, match="max_new_tokens"):
        oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                               extra_body={"min_tokens": 3})
    with pytest.raises(openai.BadRequestError, match="output constraint"):
        oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4,
                               extra_body={"min_tokens": 2, "regex": "[a-z]+"})


def test_continue_final_message_and_include_stop_str(oai, tokenizer, greedy_completion) -> None:
    """vLLM's chat fields: ``continue_final_message`` renders the conversation with the final
    assistant message left open (transformers' own rendering), and the completion continues
    it exactly as a plain completion of those ids would; it needs ``add_generation_prompt``
    false and a final assistant message (else a 400). ``include_stop_str_in_output`` keeps
    the matched stop string."""
    msgs = [{"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "The colour is"}]
    ids = tokenizer.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False,
                                           continue_final_message=True, return_dict=False)
    assert tokenizer.decode(ids).endswith("The colour is")
    chat = oai.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=4, **GREEDY,
        extra_body={**NO_EOS, "add_generation_prompt": False, "continue_final_message": True})
    plain = oai.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, **GREEDY,
                                   extra_body=NO_EOS)
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == plain.choices[0].text
    for extra in ({"continue_final_message": True}, {"add_generation_prompt": False,
                                                     "continue_final_message": True}):
        with pytest.raises(openai.BadRequestError, match="continue_final_message"):
            oai.chat.completions.create(model=MODEL_NAME, max_tokens=2, extra_body=extra,
                                        messages=msgs if len(extra) == 1 else msgs[:1])
    full = greedy_completion.choices[0].text
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2)
                 if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]), None)
    if stop is None:
        pytest.skip(f"greedy text {full!r} has no usable stop string")
    kept = oai.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, stop=[stop], **GREEDY,
        extra_body={**NO_EOS, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[:full.index(stop) + len(stop)]


def test_vllm_structured_outputs(oai) -> None:
    """vLLM's ``structured_outputs`` (what replaced ``guided_*`` in vLLM 0.12) constrains the
    output; an unsupported or unknown key is a 400, not silently ignored."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "enum": ["x", "yy"]}},
              "required": ["a"], "additionalProperties": False}
    for so, check in (({"choice": ["red", "blue"]}, lambda t: t in ("red", "blue")),
                      ({"json": schema}, lambda t: json.loads(t)["a"] in ("x", "yy")),
                      ({"regex": "[0-9]{3}"}, lambda t: len(t) == 3 and t.isdigit())):
        out = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24,
                                          extra_body={"structured_outputs": so})
        assert check(out.choices[0].message.content), (so, out.choices[0].message.content)
    for bad in ({"structural_tag": "t"}, {"bogus": 1}, {"regex": "a", "choice": ["b"]}):
        with pytest.raises(openai.BadRequestError, match="structured_outputs"):
            oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                        extra_body={"structured_outputs": bad})


def test_truncate_prompt_tokens_and_unsupported_vllm_fields(oai, tokenizer) -> None:
    """vLLM's ``truncate_prompt_tokens`` keeps the prompt's last N tokens (the output equals
    that of the truncated ids; -1 fits an over-long prompt to the window). Fields vLLM has
    and this server does not implement are a 400 when set, accepted at their defaults."""
    ids = tokenizer.encode(PROMPT * 3)
    cut = oai.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, **GREEDY,
                                 extra_body={**NO_EOS, "truncate_prompt_tokens": 5})
    tail = oai.completions.create(model=MODEL_NAME, prompt=ids[-5:], max_tokens=6, **GREEDY,
                                  extra_body=NO_EOS)
    assert cut.usage.prompt_tokens == 5 and cut.choices[0].text == tail.choices[0].text
    long = oai.completions.create(model=MODEL_NAME, prompt=[5] * 3000, max_tokens=8,
                                  extra_body={**NO_EOS, "truncate_prompt_tokens": -1})
    assert long.usage.prompt_tokens + 8 == 2048  # the tiny model's context window
    for field, value in (("use_beam_search", True), ("bad_words", ["x"]),
                         ("prompt_logprobs", 1), ("allowed_token_ids", [10 ** 9]),
                         ("truncate_prompt_tokens", 0)):
        with pytest.raises(openai.BadRequestError, match=field):
            oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                                   extra_body={field: value})
    oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1,  # defaults pass
                           extra_body={"use_beam_search": False, "bad_words": []})


def test_allowed_token_ids(oai, http, tokenizer) -> None:
    """vLLM's ``allowed_token_ids``: every sampled token is one of them (sampling at
    temperature 1, through the OpenAI route and the native one)."""
    allowed = [300, 301, 302]
    out = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                 logprobs=0, extra_body={**NO_EOS, "allowed_token_ids": allowed})
    tokens = out.choices[0].logprobs.tokens
    assert len(tokens) == 8 and set(tokens) <= {tokenizer.decode([t]) for t in allowed}
    native = http.post("/generate", json={"text": PROMPT, "sampling_params": {
        "max_new_tokens": 16, "temperature": 1.0, "allowed_token_ids": allowed}}).json()
    assert native["output_ids"] and set(native["output_ids"]) <= set(allowed)
    with pytest.raises(openai.BadRequestError, match="output constraint"):
        oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2,
                               extra_body={"allowed_token_ids": allowed, "regex": "a+"})


def test_add_special_tokens(tiny_model, tmp_path) -> None:
    """vLLM's ``add_special_tokens``: a text prompt gets the tokenizer's BOS unless it is
    false; a chat prompt gets it only when it is true (its template writes its own markers).
    Served from a copy of the tiny model whose tokenizer adds a BOS."""
    model = tmp_path / "bos-model"
    shutil.copytree(tiny_model, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    bos = next(t for t in spec["added_tokens"] if t["content"] == "<|im_start|>")
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [bos["id"]],
                                            "tokens": ["<|im_start|>"]}}}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    proc = ServerProcess(model, tmp_path / "server.log", "--api-key", API_KEY)
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key=API_KEY, max_retries=0,
                               http_client=httpx.Client(trust_env=False))

        def prompt_tokens(**kwargs) -> int:
            if "messages" in kwargs:
                return client.chat.completions.create(model=MODEL_NAME, max_tokens=1,
                                                      **kwargs).usage.prompt_tokens
            return client.completions.create(model=MODEL_NAME, max_tokens=1,
                                             **kwargs).usage.prompt_tokens

        text = prompt_tokens(prompt=PROMPT)
        assert prompt_tokens(prompt=PROMPT, extra_body={"add_special_tokens": False}) == text - 1
        chat = prompt_tokens(messages=MESSAGES)
        assert prompt_tokens(messages=MESSAGES, extra_body={"add_special_tokens": True}) == chat + 1
        assert prompt_tokens(messages=MESSAGES, extra_body={"add_special_tokens": False}) == chat
    finally:
        proc.stop()


def test_openai_errors(server) -> None:
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         http_client=httpx.Client(trust_env=False))
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0,
                        http_client=httpx.Client(trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as info:
        good.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        good.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=-1.0)
    assert info.value.param == "temperature"
