"""Build flashinfer's MLA JIT modules before the conformance suite or an engine needs them,
then run one decode through heteroserve's adapter against the torch-native MLA.

flashinfer compiles one MLA module per (FA backend, dtype) at given latent widths (here
DeepSeek's: ``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64); page size, head count and lengths
are runtime arguments. The backend is the one ``BatchMLAPagedAttentionWrapper(backend="auto")``
plans first on this GPU: ``fa3`` where sm90a is supported, else ``fa2``
(``flashinfer/mla/_batch_mla/_auto_policy.py``; other architectures prefer non-FA backends,
which this script does not build). Modules are built side by side, each through its own
``spec.build()`` (see ``flashinfer_jit_warmup.py`` for why).

Usage (on the GPU machine, flashinfer importable, ``ninja`` on PATH):
    python3 benchmarks/flashinfer_mla_warmup.py [--dtypes bf16,fp16] [--jobs 16] [--out x.json]
    PYTHONPATH=tests/vendor_doubles python3 benchmarks/flashinfer_mla_warmup.py --smoke  # cpu
Exit status 1 when a module is missing afterwards or the check decode disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flashinfer_jit_warmup import build_each  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WIDTHS = (512, 128, 64, 128)  # kv_lora_rank, qk_nope, qk_rope, v (DeepSeek-V2/V3)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # conformance/tolerances.py


def check_decode(dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """``FlashInferMLA.forward`` of a decode batch (3 sequences, 16 heads, page 16) against
    ``TorchNativeMLA`` on the same inputs: max |diff| / max |ref|, and the FA backend the
    wrapper planned."""
    from heteroserve.conformance.paged import build_batch, new_cache
    from heteroserve.core.kernels.attention import ForwardMode
    from heteroserve.core.kernels.mla import MLAConfig, MLALayer
    from heteroserve.platforms.cpu.mla import TorchNativeMLA
    from heteroserve.platforms.cuda.flashinfer_mla import FlashInferMLA

    c, dn, r, dv = WIDTHS
    config = MLAConfig(16, c, dn, r, dv, 16, dtype, device)
    gen = torch.Generator().manual_seed(0)
    seqs = ((4, 1), (76, 1), (299, 1))
    batch = build_batch(seqs, 16, ForwardMode.DECODE, device, gen)

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    cache = new_cache((batch.num_pages, 16, c + r), dtype, device)
    for b, (p, _) in enumerate(seqs):
        cache.view(-1, c + r)[batch.slots(b, 0, p).to(device)] = rand(p, c + r)
    args = (rand(3, 16, dn), rand(3, 16, r), rand(3, c), rand(3, r))
    weights = (rand(16, dn, c, std=c ** -0.5), rand(16, dv, c, std=c ** -0.5))
    layer = MLALayer(0, (dn + r) ** -0.5)
    outs = []
    for cls in (FlashInferMLA, TorchNativeMLA):
        backend = cls(config)
        backend.prepare(batch.meta)
        outs.append(backend.forward(*args, cache.clone(), *weights, layer, batch.meta).float())
        if isinstance(backend, FlashInferMLA):  # flashinfer's choice under backend="auto"
            wrapper = next(iter(backend._wrappers.values()))
            planned = getattr(wrapper, "_planned_backend_name", None)
    ref = outs[1]
    err = ((outs[0] - ref).abs().max() / ref.abs().max()).item()
    return {"rel_err": err, "tolerance": TOLERANCE[dtype], "planned_backend": planned}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--out", default=None, help="write modules, seconds and checks as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="no build: the decode checks on the cpu through the flashinfer "
                             "double (PYTHONPATH=tests/vendor_doubles)")
    args = parser.parse_args()
    if args.smoke:
        from heteroserve_vendor_doubles import install

        install("cuda")
        checks = {n: check_decode(DTYPES[n], torch.device("cpu")) for n in args.dtypes.split(",")}
        print(f"flashinfer MLA decode checks (double, cpu): {checks}")
        return 0 if all(v["rel_err"] <= v["tolerance"] for v in checks.values()) else 1
    from flashinfer.jit.attention.modules import gen_batch_mla_module
    from flashinfer.utils import is_sm90a_supported

    device = torch.device("cuda", 0)
    backend = "fa3" if is_sm90a_supported(device) else "fa2"
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if d]
    c, _, r, _ = WIDTHS
    specs = [gen_batch_mla_module(backend, dt, dt, dt, torch.int32, c, r, False) for dt in dtypes]
    print(f"flashinfer MLA JIT: {len(specs)} {backend} modules, {args.jobs} jobs", flush=True)
    start = time.perf_counter()
    seconds = build_each(specs, args.jobs, len(specs))
    wall = time.perf_counter() - start
    missing = [s.name for s in specs if not s.jit_library_path.exists()]
    checks = {}
    for name, dt in zip(args.dtypes.split(","), dtypes):
        checks[name] = check_decode(dt, device)
        print(f"  decode check {name}: {checks[name]}", flush=True)
    bad = [n for n, v in checks.items() if not v["rel_err"] <= v["tolerance"]]  # type: ignore
    print(f"flashinfer MLA JIT: {len(specs) - len(missing)} of {len(specs)} modules in "
          f"{wall:.0f} s; decode checks failed: {bad or 'none'}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": backend, "wall_s": round(wall, 1), "seconds": seconds,
                       "missing": missing, "checks": checks, "device":
                       torch.cuda.get_device_name(device)}, f, indent=1)
    return 1 if missing or bad else 0


if __name__ == "__main__":
    sys.exit(main())
