"""Where a conformance report came from: versions and git SHAs of heteroserve and of each
plugin distribution tested, torch and driver versions, and a digest of the report itself."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import platform as host
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import torch

if TYPE_CHECKING:
    from heteroserve.conformance.context import ConformanceContext

DIGEST_FIELD = "digest"
BUILTIN_SOURCES = ("heteroserve", "in-process")


def git_sha(path: Path) -> str | None:
    """``HEAD`` of the git checkout holding ``path`` (suffixed ``-dirty`` when tracked files
    changed), or None when it is not in one or git is missing."""
    try:
        sha = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], text=True,
                             capture_output=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=20).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def _distribution_sha(dist: md.Distribution) -> str | None:
    """The commit a distribution was installed from: pip's ``direct_url.json`` (a VCS
    install's ``commit_id``, or the git checkout of a local/editable install)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    info = json.loads(text)
    commit = info.get("vcs_info", {}).get("commit_id")
    if commit:
        return str(commit)
    url = urlparse(info.get("url", ""))
    return git_sha(Path(unquote(url.path))) if url.scheme == "file" else None


def distribution_info(name: str) -> dict[str, str | None]:
    """``{"distribution", "version", "git_sha"}`` of an installed distribution."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return {"distribution": name, "version": None, "git_sha": None}
    return {"distribution": name, "version": dist.version, "git_sha": _distribution_sha(dist)}


def _heteroserve_info() -> dict[str, str | None]:
    from heteroserve import __version__

    sha = git_sha(Path(__file__).resolve().parent)
    return {"distribution": "heteroserve", "version": __version__, "git_sha": sha}


def provenance(ctx: ConformanceContext) -> dict[str, Any]:
    """Versions and SHAs for the report (see the module docstring)."""
    sources = {ctx.catalog.platforms[ctx.name].source}
    sources |= {s.provider for s in ctx.catalog.registry.for_platform(ctx.name)}
    plugins = [distribution_info(s) for s in sorted(sources - set(BUILTIN_SOURCES) - {"", "?"})]
    try:
        runtime = {k: str(v) for k, v in ctx.platform.runtime_versions().items()}
    except Exception as exc:  # a report must still be written
        runtime = {"error": f"runtime_versions() raised {type(exc).__name__}: {exc}"}
    return {
        "heteroserve": _heteroserve_info(),
        "plugins": plugins,
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "hip": getattr(torch.version, "hip", None),
                  "xpu": getattr(torch.version, "xpu", None)},
        "runtime": runtime,
        "python": host.python_version(),
        "host": host.platform(),
    }


def content_digest(doc: dict[str, Any]) -> str:
    """sha256 of ``doc`` without its ``digest`` field, as sorted compact JSON."""
    body = {k: v for k, v in doc.items() if k != DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_digest(doc: dict[str, Any]) -> bool:
    """Whether ``doc``'s stated digest matches its content."""
    stated = doc.get(DIGEST_FIELD, {})
    return isinstance(stated, dict) and stated.get("sha256") == content_digest(doc)
