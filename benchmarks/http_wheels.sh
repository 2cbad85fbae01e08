#!/usr/bin/env bash
# On the host (it has PyPI): put in .whl/ the wheels that `heteroserve serve` needs on the GPU
# machine and its image lacks (FastAPI, pydantic, uvicorn, pyzmq, xgrammar and what they import
# there), for CPython 3.12 x86-64. A package that already has a wheel in .whl/ is skipped, so the
# folder keeps one version of each. Then carry .whl and run `bash benchmarks/gpu_session.sh http`.
# pytest-timeout rides along: with it, `conf_full` fails a hung case after CONF_TEST_TIMEOUT
# instead of stalling the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4
        annotated_types==0.7.0 typing_inspection==0.4.2 typing_extensions==4.16.0
        opentelemetry_api==1.45.2 uvicorn==0.55.0 pyzmq==27.3.0 xgrammar==0.2.9
        apache_tvm_ffi==0.1.15.post2 pytest_timeout==2.4.0)
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if ls .whl/ 2>/dev/null | grep -qi "^${name}-"; then
    echo "have $(ls .whl | grep -i "^${name}-" | head -1)"; continue
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$spec" 2>&1 | grep -v "^WARNING: Location" || true
done
ls -la .whl
