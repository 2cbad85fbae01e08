"""rocm/xpu/npu on a machine without them: unavailable with reasons, vendor-free imports,
specs that explain themselves; the torch-npu autoload guard; the doubles' own strictness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from heteroserve.core.kernels.registry import KernelRequest
from heteroserve.core.platform import Fp8Flavour
from heteroserve.platforms.rocm.platform import fp8_flavour_for_arch

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_vendor_platforms_unavailable_with_reasons_and_no_vendor_import() -> None:
    out = _run("""
        import json, sys, torch
        from heteroserve.core.plugins.manager import load_plugins
        from heteroserve.core.kernels.registry import KernelRequest
        c = load_plugins()
        table = {n: [e.availability.available, e.availability.reason]
                 for n, e in c.platforms.items() if n in ("rocm", "xpu", "npu")}
        refusals = {}
        for name in ("rocm", "xpu", "npu"):
            req = KernelRequest(platform=name, device_type=name, dtype=torch.bfloat16,
                                head_size=128)
            # the platform's own kernels (not those registered for every platform: the
            # torch-native fallbacks, an installed out-of-tree plugin's)
            refusals[name] = sorted({s.check(req).reason for s in c.registry.for_platform(name)
                                     if name in s.platforms
                                     and not s.name.startswith("triton")})
        vendor = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("aiter", "torch_npu",
                                               "intel_extension_for_pytorch"))
        print(json.dumps({"table": table, "refusals": refusals, "vendor": vendor}))
    """, env={"HETEROSERVE_TEST_DOUBLES": ""})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    table = data["table"]
    assert set(table) == {"rocm", "xpu", "npu"}
    assert not any(avail for avail, _ in table.values())
    assert "not a ROCm build" in table["rocm"][1]
    assert "torch.xpu is not available" in table["xpu"][1]
    assert "torch_npu is not installed" in table["npu"][1]
    assert data["refusals"]["npu"] == [table["npu"][1]]
    assert all(r.startswith("aiter is not installed") for r in data["refusals"]["rocm"])
    assert all(r.startswith("intel-extension-for-pytorch is not installed")
               for r in data["refusals"]["xpu"])
    assert data["vendor"] == []


def test_fp8_flavour_from_gcn_arch() -> None:
    assert fp8_flavour_for_arch("gfx942:sramecc+:xnack-") is Fp8Flavour.E4M3FNUZ
    assert fp8_flavour_for_arch("gfx950") is Fp8Flavour.E4M3FN
    assert fp8_flavour_for_arch("gfx90a:sramecc+:xnack-") is None


def test_npu_specs_refuse_what_torch_npu_cannot_do(torch_npu_double) -> None:
    from heteroserve.platforms.npu.plugin import npu_kernel_specs

    specs = {s.op: s for s in npu_kernel_specs()}
    base = dict(platform="npu", device_type="npu", head_size=128, page_size=128)
    attention = specs["attention"]
    assert attention.check(KernelRequest(dtype=torch.bfloat16, **base)).ok
    assert "float32" in attention.check(KernelRequest(dtype=torch.float32, **base)).reason
    assert "page size 16" in attention.check(
        KernelRequest(dtype=torch.bfloat16, **{**base, "page_size": 16})).reason
    assert "sliding" in attention.check(
        KernelRequest(dtype=torch.bfloat16, sliding_window=True, **base)).reason
    assert attention.page_sizes == (128,)


def test_autoload_guard_keeps_import_torch_working(tmp_path: Path) -> None:
    """A broken out-of-tree backend (as torch-npu is without CANN) breaks a plain
    ``import torch``; importing heteroserve first disables autoload and torch imports."""
    site = tmp_path / "site"
    dist = site / "broken_backend-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\nbroken = broken_backend:load\n")
    (site / "broken_backend.py").write_text("raise ImportError('no CANN here')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "TORCH_DEVICE_BACKEND_AUTOLOAD": ""}
    env_without = {k: v for k, v in {**os.environ, **env}.items()
                   if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    plain = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                           text=True, timeout=180, env=env_without)
    assert plain.returncode != 0 and "TORCH_DEVICE_BACKEND_AUTOLOAD" in plain.stderr
    guarded = subprocess.run([sys.executable, "-c", "import heteroserve, torch; print('ok')"],
                             capture_output=True, text=True, timeout=180, env=env_without)
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "ok"


def test_doubles_reject_layouts_the_vendor_rejects(torch_npu_double, aiter_double) -> None:
    """The doubles are strict where the real operators are, so a wrong call fails here."""
    q = torch.randn(1, 1, 4 * 64).to(torch.bfloat16)
    cache = torch.zeros(3, 16, 2 * 64, dtype=torch.bfloat16)
    table = torch.tensor([[1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_size"):
        torch_npu_double.npu_fused_infer_attention_score(
            q, cache, cache, block_table=table, block_size=128, input_layout="BSH",
            num_heads=4, num_key_value_heads=2, actual_seq_lengths_kv=[3])
    with pytest.raises(ValueError, match="int32"):
        torch_npu_double._npu_reshape_and_cache(
            torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(2, 128, 2, 64),
            torch.zeros(2, 128, 2, 64), torch.tensor([3]))
    with pytest.raises(ValueError, match="k must lie"):
        torch_npu_double.npu_top_k_top_p(torch.randn(1, 4), torch.ones(1),
                                          torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="workspace"):
        aiter_double.paged_attention_ragged(
            torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.uint8),
            torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 16, 2, 64),
            torch.zeros(2, 16, 2, 64), 0.1, torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), 16, 1,
            None, "auto", "NHD", 0.0, torch.ones(1), torch.ones(1))


def test_npu_top_k_top_p_double_follows_the_documented_formula(torch_npu_double) -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    out = torch_npu_double.npu_top_k_top_p(logits, torch.tensor([0.7, 1.0]),
                                           torch.tensor([3, 1], dtype=torch.int32))
    inf = float("-inf")
    # row 0: top-3 keeps {3, 2, 1}; probs of those ~ {.67, .24, .09}: top-p 0.7 keeps {3, 2}
    assert out[0].tolist() == [inf, 3.0, 2.0, inf]
    assert out[1].tolist() == [inf, inf, 5.0, inf]
