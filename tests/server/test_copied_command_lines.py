"""Command lines copied from vLLM's and SGLang's docs start the real server unchanged (only
the program name, the model and the port differ), and the native routes SGLang's and vLLM's
tools call answer in their shapes: ``/tokenize``, ``/detokenize``, ``/flush_cache``,
``/version``, ``/get_model_info``, ``/get_server_info``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import ServerProcess

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    """``vllm serve MODEL ...`` as vLLM's docs write it (OpenAI-compatible server page)."""
    argv = ["serve", str(tiny_model), "--host", "127.0.0.1", "--port", "{port}",
            "--dtype", "auto", "--max-model-len", "512", "--max-num-seqs", "8",
            "--gpu-memory-utilization", "0.9", "--tensor-parallel-size", "1",
            "--trust-remote-code", "--enforce-eager", "--disable-log-requests",
            "--kv-cache-dtype", "auto", "--seed", "0", "--device", "cpu",
            "--uvicorn-log-level", "warning", "--chat-template", TEMPLATE]
    proc = ServerProcess(None, tmp_path_factory.mktemp("vllm") / "server.log", argv=argv)
    yield proc
    assert proc.stop() == 0, proc.log()


def with_remote_code_tokenizer(model: Path, dest: Path) -> Path:
    """A copy of ``model`` whose tokenizer class ships in the folder (``auto_map``), as
    checkpoints that need ``--trust-remote-code`` do."""
    shutil.copytree(model, dest)
    (dest / "remote_tok.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class RemoteTok(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="RemoteTok", auto_map={"AutoTokenizer": [None, "remote_tok.RemoteTok"]})
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def test_trust_remote_code_loads_a_tokenizer_shipped_with_the_model(tiny_model: Path,
                                                                    tmp_path: Path) -> None:
    from heteroserve.core.tokenizer import load_tokenizer
    from heteroserve.core.tokenizer.loader import TokenizerError

    folder = with_remote_code_tokenizer(tiny_model, tmp_path / "m")
    with pytest.raises(TokenizerError, match="custom code"):
        load_tokenizer(folder)
    assert type(load_tokenizer(folder, trust_remote_code=True).hf).__name__ == "RemoteTok"


def _smoke(url: str) -> str:
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        r = http.post("/v1/completions", json={"model": model, "prompt": "Hello",
                                               "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        return model


def test_vllm_command_line_serves(vllm_server: ServerProcess, tiny_model: Path) -> None:
    assert _smoke(vllm_server.url) == str(tiny_model)
    info = httpx.get(vllm_server.url + "/get_server_info", trust_env=False).json()
    assert info["context_length"] == 512 and info["max_running_requests"] == 8
    assert info["disable_cuda_graph"] is True and info["device"] == "cpu"
    assert info["engine"]["max_context_len"] == 512
    assert info["internal_states"][0]["num_running_reqs"] is not None


def test_sglang_command_line_serves(tiny_model: Path, tmp_path: Path) -> None:
    """``python -m sglang.launch_server ...`` as SGLang's docs write it, on a model whose
    tokenizer needs ``--trust-remote-code`` (in the server and in the grammar compiler)."""
    model = with_remote_code_tokenizer(tiny_model, tmp_path / "model")
    argv = ["serve", "--model-path", str(model), "--host", "127.0.0.1", "--port", "{port}",
            "--tp", "1", "--mem-fraction-static", "0.8", "--context-length", "256",
            "--max-running-requests", "4", "--chunked-prefill-size", "128",
            "--log-level", "INFO", "--enable-metrics", "--trust-remote-code",
            "--disable-cuda-graph", "--kv-cache-dtype", "auto", "--device", "cpu",
            "--served-model-name", "my-model"]
    proc = ServerProcess(None, tmp_path / "server.log", argv=argv)
    try:
        assert _smoke(proc.url) == "my-model"
        info = httpx.get(proc.url + "/get_model_info", trust_env=False).json()
        assert info["model_path"] == str(model) and info["served_model_name"] == "my-model"
        regex = httpx.post(proc.url + "/generate", trust_env=False, timeout=60, json={
            "text": "Answer:", "sampling_params": {"regex": "(yes|no)", "max_new_tokens": 4}})
        assert regex.status_code == 200 and regex.json()["text"] in ("yes", "no"), regex.text
        assert "heteroserve:num_requests_running{model_name=\"my-model\"}" in httpx.get(
            proc.url + "/metrics", trust_env=False).text
    finally:
        assert proc.stop() == 0, proc.log()


def test_chat_template_flag_renders_chat_prompts(vllm_server: ServerProcess, tokenizer) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    with httpx.Client(base_url=vllm_server.url, timeout=60, trust_env=False) as http:
        tok = http.post("/tokenize", json={"messages": messages}).json()
        expected = tokenizer.encode("<|user|>hi there\n<|assistant|>", add_special_tokens=False)
        assert tok["tokens"] == expected and tok["count"] == len(expected)
        chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] == len(expected)


def test_tokenize_and_detokenize_shapes(vllm_server: ServerProcess, tokenizer) -> None:
    with httpx.Client(base_url=vllm_server.url, timeout=60, trust_env=False) as http:
        ids = tokenizer.encode("The quick brown fox")
        r = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
        assert r == {"tokens": ids, "count": len(ids), "max_model_len": 512}
        r = http.post("/v1/tokenize", json={"prompt": ["a b", "c"], "add_special_tokens": False,
                                            "return_token_strs": True}).json()
        assert r["tokens"] == [tokenizer.encode("a b", add_special_tokens=False),
                               tokenizer.encode("c", add_special_tokens=False)]
        assert r["count"] == [len(t) for t in r["tokens"]] and len(r["token_strs"]) == 2
        d = http.post("/detokenize", json={"tokens": ids}).json()
        assert d["prompt"] == d["text"] == tokenizer.decode(ids, skip_special_tokens=False)
        for path, body, param in [("/tokenize", {}, "prompt"),
                                  ("/tokenize", {"prompt": "x", "messages": []}, "prompt"),
                                  ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
                                  ("/tokenize", {"prompt": "x", "model": "other"}, "model")]:
            bad = http.post(path, json=body)
            assert 400 <= bad.status_code < 500, (body, bad.text)
            assert bad.json()["error"]["param"] == param, bad.text


def test_flush_cache_empties_the_prefix_cache(vllm_server: ServerProcess) -> None:
    prompt = " ".join(f"word{i}" for i in range(60))
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    with httpx.Client(base_url=vllm_server.url, timeout=60, trust_env=False) as http:
        def cached() -> int:
            usage = http.post("/v1/completions", json=body).json()["usage"]
            return usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)

        cached()
        assert cached() > 0
        r = http.post("/flush_cache")
        assert r.status_code == 200 and r.json()["flushed"] is True, r.text
        assert r.json()["freed_pages"] > 0
        assert cached() == 0
        assert http.get("/flush_cache").status_code == 200  # SGLang takes GET too
        assert http.get("/version").json()["version"]
