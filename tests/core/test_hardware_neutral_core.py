"""The core never names a vendor or a device type; importing heteroserve imports no vendor."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENDOR_MODULES = {"torch_npu", "aiter", "flashinfer", "intel_extension_for_pytorch", "triton"}
DEVICE_PATTERN = re.compile(
    r"torch\.(cuda|xpu|npu|hip|mps)\b|is_(cuda|hip|npu|xpu)\(|[\"'](cuda|npu|xpu|hip|mps)(:[0-9]+)?[\"']")


def _core_files() -> list[Path]:
    files = sorted((ROOT / "core").rglob("*.py"))
    assert files, "core/ has no Python files"
    return files


def test_core_imports_no_vendor_package() -> None:
    offenders = []
    for path in _core_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in VENDOR_MODULES]
    assert not offenders, "core/ imports vendor packages:\n" + "\n".join(offenders)


def test_core_names_no_device_type() -> None:
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                 for p in _core_files()
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if DEVICE_PATTERN.search(line)]
    assert not offenders, "core/ names a device type:\n" + "\n".join(offenders)


def test_checker_catches_violations(tmp_path: Path) -> None:
    """The patterns above are not vacuous."""
    for line in ('x = torch.cuda.is_available()', 'd = torch.device("cuda")', "if is_hip():",
                 "dev = 'npu:0'"):
        assert DEVICE_PATTERN.search(line), line
    for line in ('d = platform.device()', 'name = "cudagraph_runner"'):
        assert not DEVICE_PATTERN.search(line), line


def test_import_heteroserve_and_plugins_import_no_vendor() -> None:
    code = (
        "import sys, heteroserve\n"
        "from heteroserve.core.plugins.manager import load_plugins\n"
        "catalog = load_plugins()\n"
        "[e.availability for e in catalog.platforms.values()]\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(VENDOR_MODULES)!r})\n"
        "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"vendor modules imported: {out.stdout}"
