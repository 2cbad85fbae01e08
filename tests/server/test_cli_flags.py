"""SGLang's and vLLM's option spellings parse to the same ServerArgs, and each has its effect
where it takes one outside a running server (platform choice by device type, the chat
template, abbreviations refused, grouped ``--help``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from heteroserve.core.config import ServerArgs
from heteroserve.server.args import server_args_from_namespace
from heteroserve.server.cli import build_parser


def parse(*argv: str) -> ServerArgs:
    return server_args_from_namespace(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("sglang, vllm, field, value", [
    (["--model-path", "/m"], ["--model", "/m"], "model_path", "/m"),
    (["--model-path", "/m"], ["/m"], "model_path", "/m"),
    (["--tokenizer-path", "/t"], ["--tokenizer", "/t"], "tokenizer_path", "/t"),
    (["--context-length", "512"], ["--max-model-len", "512"], "context_length", 512),
    (["--max-running-requests", "7"], ["--max-num-seqs", "7"], "max_running_requests", 7),
    (["--tp-size", "2"], ["--tensor-parallel-size", "2"], "tp_size", 2),
    (["--mem-fraction-static", "0.5"], ["--gpu-memory-utilization", "0.5"],
     "mem_fraction_static", 0.5),
    (["--disable-cuda-graph"], ["--enforce-eager"], "disable_cuda_graph", True),
    (["--random-seed", "5"], ["--seed", "5"], "random_seed", 5),
    (["--page-size", "16"], ["--block-size", "16"], "page_size", 16),
    (["--kv-cache-dtype", "fp8_e4m3"], ["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "fp8_e4m3"),
    (["--kv-cache-dtype", "auto"], ["--kv-cache-dtype", "auto"], "kv_cache_dtype", "auto"),
    (["--quantization", "fp8"], ["--quantization", "fp8"], "quantization", "fp8"),
    (["--quantization", "awq"], ["--quantization", "awq_marlin"], "quantization", "awq"),
    (["--quantization", "gptq"], ["--quantization", "gptq_marlin"], "quantization", "gptq"),
    (["--trust-remote-code"], ["--trust-remote-code"], "trust_remote_code", True),
    (["--enable-metrics"], ["--enable-metrics"], "enable_metrics", True),
    (["--device", "cpu"], ["--device", "cpu"], "device", "cpu"),
    (["--log-level", "warning"], ["--log-level", "WARNING"], "log_level", "warning"),
    (["--chat-template", "t.jinja"], ["--chat-template", "t.jinja"], "chat_template", "t.jinja"),
])
def test_sglang_and_vllm_spellings_agree(sglang, vllm, field, value) -> None:
    assert getattr(parse(*sglang), field) == value
    assert getattr(parse(*vllm), field) == value


def test_log_level_any_case_and_bad_level_refused(capsys) -> None:
    assert parse("--log-level", "INFO").log_level == "info"
    assert parse("--log-level", "Debug").log_level == "debug"
    with pytest.raises(SystemExit):
        parse("--log-level", "LOUD")
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_device_is_not_read_as_device_index_and_abbreviations_are_refused(capsys) -> None:
    args = parse("--device", "cpu", "--device-index", "0")
    assert (args.device, args.device_index) == ("cpu", 0)
    with pytest.raises(SystemExit):
        parse("--max-running", "4")  # an abbreviation of --max-running-requests
    assert "unrecognized arguments: --max-running" in capsys.readouterr().err


def test_positional_model_contradicting_model_path_is_an_error() -> None:
    assert parse("/m", "--model-path", "/m").model_path == "/m"
    with pytest.raises(ValueError, match="contradicts --model-path"):
        parse("/a", "--model-path", "/b")


def test_bad_kv_cache_dtype_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "int4")
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_help_groups_options_like_sglang() -> None:
    out = subprocess.run([sys.executable, "-m", "heteroserve.server.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    titles = ["model and tokenizer:", "quantization and data type:", "memory and scheduling:",
              "platform, device and kernels:", "parallelism:", "HTTP server:",
              "logging and metrics:", "API options:"]
    positions = [out.index(t) for t in titles]
    assert positions == sorted(positions)
    model_section = out[positions[0]:positions[1]]
    assert "--max-model-len" in model_section and "--chat-template" in model_section
    assert "always serves" in out[out.index("logging and metrics:"):]  # --enable-metrics


def test_device_chooses_the_platform_by_device_type() -> None:
    from heteroserve.core.plugins.manager import PlatformSelectionError, load_plugins

    catalog = load_plugins()
    assert catalog.select("auto", "cpu").device_type == "cpu"
    assert catalog.select("cpu", "cpu").name == "cpu"
    with pytest.raises(PlatformSelectionError, match="no available platform drives"):
        catalog.select("auto", "no-such-device")
    with pytest.raises(PlatformSelectionError, match="contradicts --platform cpu"):
        catalog.select("cpu", "no-such-device")


def test_chat_template_file_inline_and_bad(tiny_model: Path, tmp_path: Path) -> None:
    from heteroserve.core.tokenizer import load_tokenizer
    from heteroserve.core.tokenizer.loader import TokenizerError

    inline = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}<<go>>"
    file = tmp_path / "t.jinja"
    file.write_text(inline.replace("<<", "[["))
    msgs = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(tiny_model, inline).apply_chat_template(msgs) == "<<user>>hi<<go>>"
    assert load_tokenizer(tiny_model, str(file)).apply_chat_template(msgs) == "[[user>>hi[[go>>"
    default = load_tokenizer(tiny_model)
    assert "<<user>>" not in default.apply_chat_template(msgs)
    with pytest.raises(TokenizerError, match="neither a file nor inline Jinja"):
        load_tokenizer(tiny_model, str(tmp_path / "missing.jinja"))
    with pytest.raises(TokenizerError, match="does not parse"):
        load_tokenizer(tiny_model, "{% for m in messages %}")
