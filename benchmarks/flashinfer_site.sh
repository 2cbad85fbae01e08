#!/usr/bin/env bash
# On the host (PyPI reachable): build .whl/fi_site.tar.xz, the flashinfer that
# benchmarks/gpu_session.sh unpacks into /tmp/site on the GPU machine (which has torch, triton,
# nvcc and heteroserve's dependencies, but no flashinfer and no package registry). Usage:
#   bash benchmarks/flashinfer_site.sh [OUT]          # OUT default .whl/fi_site.tar.xz
# The site holds
#   flashinfer/ + its dist-info   flashinfer-python 0.7.4 (FI_WHEEL, else /tmp/fi's copy, else
#                                 `pip download --no-deps`), pruned as below
#   pynvml.py                     nvidia-ml-py: `import flashinfer` imports pynvml, which torch
#                                 does not require (apache-tvm-ffi, requests, jinja2, packaging,
#                                 numpy come from .whl or the image; no torch, no nvidia-* CUDA
#                                 libraries)
#   ninja/, fi_bin/ninja          the ninja wheel; flashinfer's JIT runs `ninja` from PATH, so
#                                 gpu_session.sh's fi_mla step puts /tmp/site/fi_bin on PATH
#                                 when the image has none
# Pruning (the wheel unpacks to ~720 MB, 452 MB of it kernel sources under data/):
#   - data/csrc keeps only the include closure (every #include "..."/<...> resolved against
#     flashinfer's JIT include dirs, conditional ones too) of the sources the used modules
#     compile: batch_mla_* (MLA, fa2 and sm90 fa3: jit/attention/modules.py
#     gen_batch_mla_module), batch_decode*/batch_prefill* (FlashInferAttention), norm.cu and
#     page.cu with their bindings (jit/norm.py, jit/page.py), the fp8 block-scale GEMM for
#     sm90 (jit/gemm/fp8_blockscale.py: TensorRT-LLM's runner, whose DeepGEMM kernels NVRTC
#     compiles at run time from csrc/nv_internal/tensorrt_llm/deep_gemm, kept whole);
#     everything else in csrc goes
#   - data/include, data/cutlass/include, data/cutlass/tools/util/include, data/spdlog and
#     data/cccl stay whole (the JIT's -I/-isystem dirs, jit/env.py; the vendored CCCL takes
#     precedence over the CUDA toolkit's copy, so half of it would mix two versions)
#   - kernel sources outside data/ (.cu .cuh .h .hpp .c .cc .cpp .inc: the cake_* backends,
#     experimental/, fused_moe/, moe_ep/ build their own) go; their Python stays where
#     `import flashinfer` imports it
#   - the Python of flashinfer/moe_ep and of flashinfer/experimental (but its __init__ and
#     cake_nvfp4_per_token, imported at `import flashinfer`) goes: opt-in backends only
#   - the wheel's build_backend.py, build_utils.py and b12x/ (not flashinfer) go
# Checks before writing: the include closure of the pruned tree misses exactly what the full
# tree misses (system and CUDA headers); `import flashinfer`, the MLA wrapper and the JIT
# generators import from the pruned site; the MLA modules' sources and ninja files generate
# (FLASHINFER_CUDA_ARCH_LIST=9.0a, nothing compiled here).
set -euo pipefail
FI_VERSION=0.7.4
OUT=$(realpath -m "${1:-.whl/fi_site.tar.xz}")
WORK=$(mktemp -d /tmp/fi_site.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
mkdir -p "$WORK/dl" "$SITE" "$(dirname "$OUT")"

wheel=${FI_WHEEL:-/tmp/fi/flashinfer_python-$FI_VERSION-py3-none-any.whl}
if [ ! -f "$wheel" ]; then
  python3 -m pip download -q --no-deps "flashinfer-python==$FI_VERSION" -d "$WORK/dl"
  wheel=$WORK/dl/flashinfer_python-$FI_VERSION-py3-none-any.whl
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 -d "$WORK/dl" "nvidia-ml-py==13.615.71" "ninja==1.13.2"
for w in "$wheel" "$WORK"/dl/nvidia_ml_py-*.whl "$WORK"/dl/ninja-*.whl; do
  unzip -q -o "$w" -d "$SITE"
done
mkdir -p "$SITE/fi_bin"
mv "$SITE"/ninja-*.data/scripts/ninja "$SITE/fi_bin/ninja" && chmod +x "$SITE/fi_bin/ninja"
rm -rf "$SITE"/ninja-*.data "$SITE/build_backend.py" "$SITE/build_utils.py" "$SITE/b12x" \
  "$SITE/example.py"  # nvidia-ml-py ships a top-level example.py
full_mb=$(du -sm "$SITE" | cut -f1)

python3 - "$SITE/flashinfer" <<'EOF'
import os, re, shutil, sys

pkg = sys.argv[1]
data = os.path.join(pkg, "data")
csrc = os.path.join(data, "csrc")
NV = "csrc/nv_internal"
INC = [os.path.join(data, d) for d in (
    "cccl/cub", "cccl/libcudacxx/include", "cccl/thrust", "include", "csrc",
    "cutlass/include", "cutlass/tools/util/include", "spdlog/include",
    # gen_fp8_blockscale_gemm_sm90_module's include dirs; the last is also the one its
    # DeepGEMM kernels are compiled against at run time (NVRTC)
    NV, f"{NV}/include", f"{NV}/tensorrt_llm/cutlass_extensions/include",
    f"{NV}/tensorrt_llm/kernels/cutlass_kernels/include",
    f"{NV}/tensorrt_llm/kernels/cutlass_kernels", f"{NV}/tensorrt_llm")]
ROOTS = re.compile(r"(batch_mla|batch_decode|batch_prefill|norm\.cu$|flashinfer_norm_binding"
                   r"|page\.cu$|flashinfer_page_binding|fp8_blockscale_gemm_sm90_binding)")
#: sources below csrc of the fp8 block-scale GEMM module (jit/gemm/fp8_blockscale.py) and the
#: DeepGEMM headers its runtime JIT reads
NESTED_ROOTS = (
    "nv_internal/tensorrt_llm/kernels/cutlass_kernels/fp8_blockscale_gemm/fp8_blockscale_gemm.cu",
    "fused_moe/cutlass_backend/deepgemm_jit_setup.cu",
    *(f"nv_internal/cpp/common/{f}" for f in (
        "envUtils.cpp", "logger.cpp", "stringUtils.cpp", "tllmException.cpp", "memoryUtils.cu")),
)
DEEP_GEMM = "nv_internal/tensorrt_llm/deep_gemm"
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
KERNEL_EXT = {".cu", ".cuh", ".h", ".hpp", ".c", ".cc", ".cpp", ".inc"}
KEEP_EXPERIMENTAL = ("__init__.py", "cake_nvfp4_per_token")


def closure() -> tuple[set[str], set[str]]:
    """(files reached from the roots, include names found in no include dir)."""
    todo = [os.path.join(csrc, f) for f in os.listdir(csrc)
            if os.path.isfile(os.path.join(csrc, f)) and ROOTS.match(f)]
    todo += [os.path.join(csrc, f) for f in NESTED_ROOTS]
    todo += [os.path.join(csrc, DEEP_GEMM, f) for f in os.listdir(os.path.join(csrc, DEEP_GEMM))]
    seen, missing = set(), set()
    while todo:
        path = os.path.normpath(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        with open(path, errors="replace") as f:
            names = INCLUDE.findall(f.read())
        for name in names:
            for cand in [os.path.join(os.path.dirname(path), name)] + [
                    os.path.join(d, name) for d in INC]:
                if os.path.isfile(cand):
                    todo.append(cand)
                    break
            else:
                missing.add(name)
    return seen, missing


needed, missing_full = closure()
for root, dirs, files in os.walk(pkg):
    rel = os.path.relpath(root, pkg)
    for f in files:
        path = os.path.join(root, f)
        top = rel.split(os.sep)[0]
        if rel == "data" and f.endswith(".py"):
            drop = True
        elif top == "data":
            drop = (rel.startswith(os.path.join("data", "csrc")) and path not in needed) or (
                rel.startswith(os.path.join("data", "cutlass", "tools"))
                and not rel.startswith(os.path.join("data", "cutlass", "tools", "util")))
        elif top == "moe_ep":
            drop = True
        elif top == "experimental":
            sub = rel.split(os.sep)[1] if os.sep in rel else f
            drop = sub not in KEEP_EXPERIMENTAL or os.path.splitext(f)[1] in KERNEL_EXT
        else:
            drop = os.path.splitext(f)[1] in KERNEL_EXT
        if drop:
            os.remove(path)
for root, dirs, files in os.walk(pkg, topdown=False):
    if not os.listdir(root):
        os.rmdir(root)
shutil.rmtree(os.path.join(pkg, "moe_ep"), ignore_errors=True)
kept, missing_pruned = closure()
if missing_pruned != missing_full or len(kept) != len(needed):
    sys.exit(f"prune check failed: now unresolved {sorted(missing_pruned - missing_full)}")
print(f"prune: kept {len(needed)} files of the JIT include closure "
      f"({sum(1 for p in needed if p.startswith(csrc))} in csrc); unresolved includes are "
      f"system/CUDA headers ({len(missing_full)}), the same before and after")
EOF

# the pruned site imports, and generates the MLA modules' sources and ninja files
FLASHINFER_WORKSPACE_BASE=$WORK/ws FLASHINFER_CUDA_ARCH_LIST=9.0a PYTHONPATH=$SITE python3 - <<'EOF'
import torch
import flashinfer
import flashinfer.norm  # noqa: F401
from flashinfer.jit.attention.modules import (  # noqa: F401
    gen_batch_decode_module, gen_batch_mla_module, gen_batch_prefill_module,
)
from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata  # noqa: F401

assert flashinfer.__version__ == "0.7.4", flashinfer.__version__
from flashinfer.gemm import fp8_blockscale_gemm_sm90  # noqa: F401
from flashinfer.jit.gemm import gen_fp8_blockscale_gemm_sm90_module

spec = gen_fp8_blockscale_gemm_sm90_module()
spec.write_ninja()
assert all(s.exists() for s in spec.sources), spec.name
for backend in ("fa2", "fa3"):
    for dt in (torch.bfloat16, torch.float16):
        spec = gen_batch_mla_module(backend, dt, dt, dt, torch.int32, 512, 64, False)
        spec.write_ninja()
        assert all(s.exists() for s in spec.sources), spec.name
print(f"import check: flashinfer {flashinfer.__version__} from {flashinfer.__file__}; "
      "MLA sources + build.ninja generated for fa2/fa3 x bf16/fp16, and the fp8 "
      "block-scale GEMM's")
EOF
PYTHONPATH=$SITE "$SITE/fi_bin/ninja" --version >/dev/null

site_mb=$(du -sm "$SITE" | cut -f1)
(cd "$SITE" && XZ_OPT=${XZ_OPT:--6 -T0} tar cJf "$OUT" --owner=0 --group=0 .)
echo "site: $full_mb MB unpacked -> $site_mb MB pruned -> $(du -h "$OUT" | cut -f1) $OUT"
