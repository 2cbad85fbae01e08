"""The README's examples work in the README's own install: its set-up is exactly two commands
(server, tests); every package its Python examples import comes with the server's install;
and its examples run against a server started the README's way (the default model; only the
port and the model placeholder are substituted)."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_PORT = "30000"


def _sections() -> dict[str, list[tuple[str, str]]]:
    """README code blocks per ``##`` section: ``[(language, code), ...]``."""
    out: dict[str, list[tuple[str, str]]] = {}
    section = ""
    for part in re.split(r"^(## .*)$", README.read_text(), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        out.setdefault(section, []).extend(
            re.findall(r"^```(\w+)\n(.*?)^```", part, flags=re.M | re.S))
    return out


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_setup_is_two_commands_and_covers_python_example_imports() -> None:
    tomllib = pytest.importorskip("tomllib")
    setup = _sections()["Set up"]
    assert [lang for lang, _ in setup] == ["bash", "bash"]
    server_cmd, test_cmd = (code.strip() for _, code in setup)
    assert "heteroserve serve" in server_cmd and "pytest" in test_cmd
    extras = re.search(r'-e "\.\[([\w,]+)\]"', server_cmd).group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _requirement_names(project["dependencies"]) | {"heteroserve"}
    for extra in extras:
        installed |= _requirement_names(project["optional-dependencies"][extra])
    imported = set()
    for lang, code in _sections()["Use it"]:
        if lang == "python":
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported.add(node.module.split(".")[0])
    assert imported, "the README has Python examples"
    missing = sorted(imported - installed)
    assert not missing, f"README examples import {missing}, not installed by {server_cmd!r}"


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The README's server command (after ``&&``), on a free port, with a fresh
    ``HETEROSERVE_HOME`` so that the default model is built as on a fresh machine."""
    server_cmd = _sections()["Set up"][0][1].split("&&", 1)[1].strip()
    argv = shlex.split(server_cmd.replace(README_PORT, "{port}"))
    assert argv[:2] == ["heteroserve", "serve"]
    home = tmp_path_factory.mktemp("heteroserve-home")
    env = {**os.environ, "HETEROSERVE_HOME": str(home)}
    proc = ServerProcess(None, tmp_path_factory.mktemp("readme") / "server.log",
                         argv=argv[1:], env=env)
    proc.home = home  # type: ignore[attr-defined]
    yield proc
    assert proc.stop() == 0, proc.log()


def _run(lang: str, code: str, port: int, home: Path) -> str:
    code = code.replace(README_PORT, str(port))
    code = code.replace("/path/to/model", str(home / "heteroserve-tiny-llama"))
    env = {**os.environ, "HETEROSERVE_HOME": str(home), "NO_PROXY": "127.0.0.1"}
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail",
                                                                  "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, f"README {lang} example failed:\n{code}\n{run.stderr[-3000:]}"
    return run.stdout


def test_use_it_examples_run(readme_server: ServerProcess) -> None:
    blocks = _sections()["Use it"]
    assert len(blocks) >= 4
    for lang, code in blocks:
        out = _run(lang, code, readme_server.port, readme_server.home)  # type: ignore[attr-defined]
        if lang == "bash" and "curl" in code:
            assert '"choices"' in out, out


def test_platform_listing_examples_run(readme_server: ServerProcess) -> None:
    """The Platforms block's listing commands (the others need an NPU or run the suite)."""
    block = next(code for lang, code in _sections()["Platforms"] if lang == "bash")
    listing = [line.split("#")[0].strip() for line in block.splitlines()
               if line.startswith("heteroserve platforms")]
    assert len(listing) == 2
    bindir = Path(sys.executable).parent
    for line in listing:
        env_path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
        run = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PATH": env_path})
        assert run.returncode == 0 and "cpu" in run.stdout, run.stderr
