#!/usr/bin/env bash
# On the lent GPU machine: install (plus flashinfer from .whl/fi_site.tar.xz when carried),
# then run the named steps, writing everything under $OUT. Usage:
#   bash benchmarks/gpu_session.sh gemv decode1 profile conformance
# Steps: gemv (benchmarks/gemv_sweep.py), gemv_fused (benchmarks/gemv_fused_sweep.py),
# conf_full (cuda, in CONF_WORKERS pytest-xdist workers so the Triton and flashinfer JIT
# builds run in parallel; CONF_FILTER is a -k expression; at CONF_TIMEOUT it gets SIGINT and
# still writes the report of what ran), decode1_variants (batch-1 decode without PDL, with
# the prologue-fused GEMVs, and with the defaults), decode1 (batch-1 decode: default kernels, then cuBLAS
# linears for comparison), profile (batch-1 decode profile), conformance (cuda, full),
# conf_triton (cuda without flashinfer), conf_flashinfer (flashinfer, bf16 head size 128),
# triton_tests (tests/triton compiled), decode1_only, bench_rest (throughput, shared_prefix,
# hf), conf_changed (the ops this change touched),
# tests (tests/triton + model/scheduler parity on the GPU), bench (bench_llama8b.py, every
# workload).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
if [ -f .whl/fi_site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/fi_site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
fi
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (pyzmq for the engine's model check)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2 && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
# batch-1 decode with the kernels HS_KERNELS names (if any); writes $OUT/decode1_<label>.json
decode1() {
  HS_GRAPH_MAX_BS=1 timeout 120 python3 benchmarks/bench_llama8b.py --workloads decode1 \
    --out "$OUT/decode1_$1.json" 2>&1 | grep -E "decode1|ceilings"
}
for step in "$@"; do
  stamp "== $step =="
  case $step in
    gemv) timeout 200 python3 benchmarks/gemv_sweep.py --out "$OUT/gemv.json" ;;
    gemv_fused) timeout 200 python3 benchmarks/gemv_fused_sweep.py --out "$OUT/gemv_fused.json" ;;
    conf_full) timeout -s INT -k 30 "${CONF_TIMEOUT:-420}" heteroserve conformance \
        --platform cuda --report "$OUT/full" -- -q -p no:cacheprovider \
        -n "${CONF_WORKERS:-12}" ${CONF_FILTER:+-k "$CONF_FILTER"} 2>&1 | tail -40 ;;
    decode1) decode1 default; HS_KERNELS=linear.unquantized=torch_native decode1 cublas ;;
    decode1_only) decode1 default ;;
    decode1_variants)  # PDL off, then the prologue-fused GEMVs, then the defaults
      HETEROSERVE_TRITON_PDL=0 decode1 nopdl
      HS_KERNELS=linear.unquantized=triton_fused decode1 fused_gemv
      decode1 default ;;
    bench_rest) timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_llama8b.py \
        --workloads throughput,shared_prefix,hf --out "$OUT/bench_b_c_d.json" 2>&1 \
        | grep -E "^\[" ;;
    conf_changed) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/changed" -- -q -p no:cacheprovider \
        -k "not flashinfer and (linear or rotary or sampling or graph or model or decode)" \
        2>&1 | tail -22 ;;
    profile) HS_GRAPH_MAX_BS=1 timeout 120 python3 benchmarks/profile_llama8b.py 1 \
        > "$OUT/profile_decode1.txt" 2>&1; grep -A16 "== decode" "$OUT/profile_decode1.txt" | cut -c1-60,150-200 ;;
    conformance) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT" -- -q -p no:cacheprovider 2>&1 | tail -15 ;;
    conf_triton) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/triton" -- -q -p no:cacheprovider -k "not flashinfer" 2>&1 | tail -22 ;;
    conf_flashinfer) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/flashinfer" -- -q -p no:cacheprovider \
        -k "flashinfer and (bf16 or not attention) and (d128 or not attention)" 2>&1 | tail -12 ;;
    triton_tests) timeout 200 python3 -m pytest tests/triton -q -p no:cacheprovider 2>&1 \
        | tail -6 ;;
    tests) HETEROSERVE_TEST_PLATFORM=cuda timeout 240 python3 -m pytest tests/triton \
        tests/models tests/scheduler -q -p no:cacheprovider 2>&1 | tail -8 ;;
    bench) timeout 560 python3 benchmarks/bench_llama8b.py --out "$OUT/bench.json" 2>&1 \
        | grep -vi warn ;;
    *) echo "unknown step $step" ;;
  esac
done
stamp "done"
ls -la "$OUT"
