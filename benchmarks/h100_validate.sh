#!/usr/bin/env bash
# On the GPU machine: install, then (1) the model parity tests on the cuda device with
# torch-native kernels and with the default (Triton) kernels, (2) the conformance suite for
# the cuda platform, report under $OUT. Usage: bash benchmarks/h100_validate.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
heteroserve platforms --explain --platform cuda --dtype bfloat16 2>&1 | tee "$OUT/platforms.txt" | head -30
NATIVE=$(python3 -c "from heteroserve.core.kernels.dispatch import wanted_ops; print(','.join(f'{o}=torch_native' for o in wanted_ops()))")
echo "== parity on cuda, torch-native kernels =="
HETEROSERVE_TEST_PLATFORM=cuda HETEROSERVE_TEST_KERNELS=$NATIVE timeout 240 \
  python3 -m pytest tests/models tests/scheduler -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/parity_native.txt"
echo "== parity on cuda, default kernels =="
HETEROSERVE_TEST_PLATFORM=cuda timeout 240 \
  python3 -m pytest tests/models tests/scheduler -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/parity_default.txt"
echo "== conformance cuda =="
timeout ${CONF_TIMEOUT:-300} heteroserve conformance --platform cuda --report "$OUT" -- -q -p no:cacheprovider 2>&1 | tail -25
ls -la "$OUT"
