#!/usr/bin/env bash
# On the host (nvcc 13 + PyPI; no GPU): flashinfer's sm90 fp8 block-scale GEMM built ahead of
# time for the GPU machine, so a call spends no device time compiling it.
#
#   bash benchmarks/flashinfer_aot.sh [SITE_TAR] [CUBINS_TAR]
#     SITE_TAR    default .whl/fi_site.tar.xz (benchmarks/flashinfer_site.sh), rewritten in place
#                 with flashinfer/data/aot/fp8_blockscale_gemm_90/fp8_blockscale_gemm_90.so, which
#                 flashinfer 0.7.4 loads instead of JIT-building the module (jit/env.py
#                 get_aot_artifacts: the package's data/aot fallback path)
#     CUBINS_TAR  default .whl/deepgemm_cubins.tar.xz: cache/<name>/nvcc_kernel.cubin for every
#                 DeepGEMM tile the module's runner picks at DG_SHAPES (N x K, default
#                 Llama-3.1-8B's qkv, o, gate_up, down) for M = 64 (its own block M) and
#                 128..DG_M_MAX in steps of 128 (above 64 rows the choice depends on
#                 ceil(M / 128) only) on DG_SMS multiprocessors
#                 (default 132: H100 SXM and H200); gpu_session.sh's fp8fi step unpacks it into
#                 $TRTLLM_DG_CACHE_DIR, where the runner looks before compiling with nvcc
#
# The module's sources include nvrtc.h, cublasLt.h and curand_kernel.h, which a bare CUDA
# toolkit may lack: their header wheels come from PyPI. Its link needs -lcuda and -lnvrtc:
# stand-ins, the first exporting the driver symbols the module uses (named libcuda.so.1, so the
# module loads the GPU machine's driver), the second empty (the runner compiles with nvcc and
# calls no NVRTC function, so the module does not name it). Checks before writing: the module's NEEDED entries name libcuda.so.1
# and libcudart.so.13, and every tile compiled.
set -euo pipefail
SITE_TAR=$(realpath -m "${1:-.whl/fi_site.tar.xz}")
CUBINS_TAR=$(realpath -m "${2:-.whl/deepgemm_cubins.tar.xz}")
DG_SHAPES=${DG_SHAPES:-6144x4096 4096x4096 28672x4096 4096x14336}
DG_M_MAX=${DG_M_MAX:-16384} DG_SMS=${DG_SMS:-132}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/fi_aot.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
mkdir -p "$SITE" "$WORK/dl" "$WORK/stub" "$WORK/dg/cache"
tar xJf "$SITE_TAR" -C "$SITE"

python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/dl" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25"
for w in "$WORK"/dl/*.whl; do unzip -q -o "$w" 'nvidia/*/include/*' -d "$WORK/hdr"; done
INC=$WORK/hdr/nvidia/cu13/include
for sym in cuGetErrorString cuKernelGetName cuLibraryEnumerateKernels cuLibraryGetKernelCount \
    cuLibraryLoadData cuLibraryUnload; do
  echo "int $sym(void) { return 0; }"
done > "$WORK/stub/stub.c"
gcc -shared -fPIC -o "$WORK/stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$WORK/stub/stub.c"
# -lnvrtc too, though nothing of it is called (the runner compiles its tiles with nvcc)
gcc -shared -fPIC -o "$WORK/stub/libnvrtc.so" -Wl,-soname,libnvrtc.so.13 -x c /dev/null

FLASHINFER_CUDA_ARCH_LIST=9.0a PATH=$SITE/fi_bin:$PATH PYTHONPATH=$SITE \
FLASHINFER_WORKSPACE_BASE=$WORK/ws FLASHINFER_EXTRA_CUDAFLAGS="-I$INC" \
FLASHINFER_EXTRA_CFLAGS="-I$INC" FLASHINFER_EXTRA_LDFLAGS="-L$WORK/stub" python3 - <<'EOF'
import shutil
import subprocess
import time

from flashinfer.jit import env
from flashinfer.jit.gemm import gen_fp8_blockscale_gemm_sm90_module

t0 = time.time()
spec = gen_fp8_blockscale_gemm_sm90_module()
spec.build()
needed = subprocess.run(["readelf", "-d", str(spec.jit_library_path)], check=True,
                        capture_output=True, text=True).stdout
for lib in ("libcuda.so.1", "libcudart.so.13"):
    assert f"[{lib}]" in needed, f"{spec.name}.so does not name {lib}"
aot = env.FLASHINFER_AOT_DIR / spec.name
aot.mkdir(parents=True, exist_ok=True)
shutil.copy(spec.jit_library_path, aot / f"{spec.name}.so")
print(f"{spec.name}: built in {time.time() - t0:.0f} s -> {aot / spec.name}.so")
EOF
(cd "$SITE" && XZ_OPT=${XZ_OPT:--6 -T0} tar cJf "$SITE_TAR" --owner=0 --group=0 .)

NV=$SITE/flashinfer/data/csrc/nv_internal
OBJ=$(find "$WORK/ws" -type d -name fp8_blockscale_gemm_90 | head -1)
nvcc -std=c++17 -O1 -o "$WORK/deepgemm_kernels" "$REPO/benchmarks/deepgemm_kernels.cu" \
  -I"$NV/tensorrt_llm" -I"$NV" -I"$NV/include" -I"$INC" \
  -I"$SITE/flashinfer/data/cutlass/include" "$OBJ"/common_logger.o "$OBJ"/common_stringUtils.o \
  "$OBJ"/common_tllmException.o "$OBJ"/common_envUtils.o -L"$WORK/stub" -lcuda 2>&1 \
  | grep -v -i "warning\|^ *$\|^ *\^\|detected during\|note #" || true
for shape in $DG_SHAPES; do
  for m in 64 $(seq 128 128 "$DG_M_MAX"); do
    LD_LIBRARY_PATH=$WORK/stub "$WORK/deepgemm_kernels" "$m" "${shape%x*}" "${shape#*x}" \
      "$DG_SMS" "$WORK/dg/cache"
  done
done | sort -u > "$WORK/dg/names.txt"
# the runner's nvcc flags (deep_gemm::jit::Compiler::build); its include dir is the site's
compile() {
  nvcc "$1/kernel.cu" -o "$1/nvcc_kernel.cubin" -std=c++17 --gpu-architecture=sm_90a \
    --ptxas-options=-allow-expensive-optimizations=true --ptxas-options=--register-usage-level=10 \
    --diag-suppress=161,174,177,940 -D__FORCE_INCLUDE_CUDA_FP16_HPP_FROM_FP16_H__=1 \
    -D__FORCE_INCLUDE_CUDA_BF16_HPP_FROM_BF16_H__=1 -O3 -cubin --expt-relaxed-constexpr \
    --expt-extended-lambda --compiler-options=-fPIC,-O3,-Wno-deprecated-declarations,-Wno-abi \
    -I"$NV/tensorrt_llm" > "$1/nvcc.log" 2>&1 || { tail -5 "$1/nvcc.log"; return 1; }
  rm "$1/nvcc.log" "$1/kernel.cu"
}
export -f compile
export NV
sed "s|^|$WORK/dg/cache/|" "$WORK/dg/names.txt" | xargs -P "$(nproc)" -I{} bash -c 'compile {}'
n=$(wc -l < "$WORK/dg/names.txt")
[ "$(find "$WORK/dg/cache" -name nvcc_kernel.cubin | wc -l)" = "$n" ] || { echo "cubins missing"; exit 1; }
(cd "$WORK/dg" && XZ_OPT=${XZ_OPT:--6 -T0} tar cJf "$CUBINS_TAR" --owner=0 --group=0 cache)
echo "site: $(du -h "$SITE_TAR" | cut -f1) $SITE_TAR; $n DeepGEMM tiles ($DG_SHAPES, M 64-$DG_M_MAX," \
  "$DG_SMS SMs): $(du -h "$CUBINS_TAR" | cut -f1) $CUBINS_TAR"
