"""CI: every extra of pyproject.toml resolves, from PyPI, to a working set.

For each extra, ``pip install --dry-run --ignore-installed --report`` resolves the core
requirements plus the extra's (read from pyproject.toml, so nothing is built) in a fresh
venv whose pip (>= 25.3) stops after resolving, having read only metadata: PEP 658 files
where the index serves them, else the wheel's METADATA through HTTP range requests
(``--use-feature=fast-deps``), so the multi-GB torch and CUDA wheels are never downloaded.
The machine's pip configuration is ignored: the question is what a user gets from PyPI. Then each result is
checked against what the platform accepts (:data:`RULES`): exactly one torch, within the
core requirement; a vendor package built for one torch major.minor (torch-npu, IPEX) must
match it, and ``[xpu]`` must bring no IPEX. A resolution conflict or a rule broken fails
(exit 1); a machine without a route to PyPI prints one line and exits 0.

    python .ci/check_extras.py [--pyproject PATH] [EXTRA ...]     # default: every extra
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = "https://pypi.org/simple/"
PIP = "pip>=25.3"  # from 25.3, --dry-run returns after resolving, before any download
TIMEOUT_S = 150


@dataclass(frozen=True)
class Resolution:
    extra: str
    versions: dict[str, str]  # canonical name -> version
    error: str = ""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


def _pinned_to_torch(dist: str) -> Callable[[dict[str, str]], str | None]:
    """``dist`` (when resolved) is built for one torch major.minor: it must be this one."""
    def rule(v: dict[str, str]) -> str | None:
        if dist in v and _major_minor(v[dist]) != _major_minor(v["torch"]):
            return f"{dist} {v[dist]} is built for torch {'.'.join(map(str, _major_minor(v[dist])))}"\
                   f", the set has torch {v['torch']}"
        return None
    return rule


def _requires(*dists: str) -> Callable[[dict[str, str]], str | None]:
    def rule(v: dict[str, str]) -> str | None:
        missing = [d for d in dists if d not in v]
        return f"{', '.join(missing)} missing from the set" if missing else None
    return rule


def _excludes(dist: str, why: str) -> Callable[[dict[str, str]], str | None]:
    def rule(v: dict[str, str]) -> str | None:
        return f"{dist} {v[dist]} is in the set ({why})" if dist in v else None
    return rule


#: extra -> checks of the resolved versions (each returns the problem, or None)
RULES: dict[str, list[Callable[[dict[str, str]], str | None]]] = {
    "cuda": [_requires("triton", "flashinfer-python")],
    "rocm": [_requires("triton", "amd-aiter")],
    "xpu": [_excludes("intel-extension-for-pytorch", "IPEX pins one torch; the xpu platform "
                      "stands on torch.xpu and IPEX is optional"),
            _pinned_to_torch("intel-extension-for-pytorch")],
    "npu": [_requires("torch-npu"), _pinned_to_torch("torch-npu")],
    "conformance": [_requires("pytest")],
}
#: vendor packages whose versions the summary shows
VENDORS = ("triton", "flashinfer-python", "amd-aiter", "torch-npu", "intel-extension-for-pytorch",
           "pytest")


def _online() -> str | None:
    """None when PyPI answers, else why not."""
    try:
        with urllib.request.urlopen(INDEX + "pip/", timeout=15) as resp:
            resp.read(64)
        return None
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


def _clean_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_CACHE_DIR=str(cache), PIP_NO_INPUT="1")
    return env


def _resolve(pip: Path, extra: str, reqs: list[str], env: dict[str, str],
             work: Path) -> Resolution:
    report = work / f"report-{extra}.json"
    cmd = [str(pip), "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
           "--use-feature=fast-deps", "--index-url", INDEX, "--report", str(report), *reqs]
    try:
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Resolution(extra, {}, f"resolution took over {TIMEOUT_S} s")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines()
                 if ln.strip() and "fast-deps" not in ln]
        return Resolution(extra, {}, " | ".join(lines[-6:]))
    data = json.loads(report.read_text())
    versions = {_canonical(i["metadata"]["name"]): i["metadata"]["version"]
                for i in data["install"]}
    return Resolution(extra, versions)


def _problems(res: Resolution, torch_spec: str) -> list[str]:
    if res.error:
        return [f"does not resolve: {res.error}"]
    v = res.versions
    if "torch" not in v:
        return ["no torch in the set"]
    problems = [p for rule in RULES.get(res.extra, []) if (p := rule(v))]
    low = re.search(r">=\s*([\d.]+)", torch_spec)
    if low and _major_minor(v["torch"]) < _major_minor(low.group(1)):
        problems.append(f"torch {v['torch']} is below the core requirement {torch_spec}")
    return problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("extras", nargs="*", metavar="EXTRA")
    args = ap.parse_args(argv)
    start = time.monotonic()
    project = tomllib.loads(args.pyproject.read_text())["project"]
    core: list[str] = project["dependencies"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    wanted = args.extras or sorted(extras)
    unknown = [e for e in wanted if e not in extras]
    if unknown:
        print(f"unknown extra(s) {', '.join(unknown)}; pyproject.toml has {', '.join(extras)}")
        return 2
    offline = _online()
    if offline is not None:
        print(f"SKIP extras resolution: no route to PyPI from this machine ({offline})")
        return 0
    torch_spec = next(r for r in core if _canonical(re.split(r"[<>=!~ ;\[]", r)[0]) == "torch")
    with tempfile.TemporaryDirectory(prefix="extras-") as tmp:
        work = Path(tmp)
        venv.EnvBuilder(with_pip=True).create(work / "venv")
        pip = work / "venv" / "bin" / "pip"
        env = _clean_env(work / "cache")
        up = subprocess.run([str(pip), "install", "--isolated", "--quiet", "--index-url", INDEX,
                             PIP], env=env, text=True, capture_output=True, timeout=TIMEOUT_S)
        if up.returncode != 0:
            print(f"FAIL: could not install {PIP} from PyPI: {up.stderr.strip()[-400:]}")
            return 1
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            results = list(pool.map(
                lambda e: _resolve(pip, e, [*extras[e], *core], env, work), wanted))
    failed = 0
    for res in results:
        problems = _problems(res, torch_spec)
        shown = ", ".join(f"{d} {res.versions[d]}" for d in ("torch", *VENDORS)
                          if d in res.versions)
        status = "FAIL" if problems else "ok"
        print(f"[{res.extra}] {status}: {shown or '-'}")
        for p in problems:
            print(f"    {p}")
        failed += bool(problems)
    print(f"{len(results) - failed}/{len(results)} extras resolve to working sets "
          f"({time.monotonic() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
