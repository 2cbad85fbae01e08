#!/usr/bin/env bash
# On the host (it has PyPI): put in .whl/ the wheels that `heteroserve serve` needs on the GPU
# machine and its image lacks (FastAPI, pydantic, uvicorn, pyzmq, xgrammar and what they import
# there), for CPython 3.12 x86-64. A package that already has a wheel in .whl/ is skipped, so the
# folder keeps one version of each. Then carry .whl and run `bash benchmarks/gpu_session.sh http`.
# pytest-timeout rides along: with it, `conf_full` fails a hung case after CONF_TEST_TIMEOUT
# instead of stalling the whole run.
# The `clients` step's real clients come too: the openai client (and the legacy httpx its test
# passes to it), SGLang's bench_serving script's aiohttp and requests, and that script itself,
# taken from the sglang 0.4.10 wheel into .whl/sglang_bench_serving.py. jsonschema is the test
# extra's, for the tool-call tests of `HETEROSERVE_TEST_PLATFORM=cuda pytest tests/server`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4
        annotated_types==0.7.0 typing_inspection==0.4.2 typing_extensions==4.16.0
        opentelemetry_api==1.45.2 uvicorn==0.55.0 pyzmq==27.3.0 xgrammar==0.2.9
        apache_tvm_ffi==0.1.15.post2 pytest_timeout==2.4.0
        openai==3.63.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 anyio==4.16.0
        sniffio==1.3.1 jiter==0.19.0 h11==0.16.0 idna==3.20 httpx==0.29.0 httpcore==1.0.9
        certifi==2026.5.20 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0
        attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
        requests==2.34.2 urllib3==2.7.0 charset_normalizer==3.4.7
        jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0
        rpds_py==0.30.0)
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
if [ ! -f .whl/sglang_bench_serving.py ]; then  # not a wheel: the session's install skips it
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps sglang==0.4.10 -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
  python3 -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('sglang/bench_serving.py'))" \
    "$(ls "$tmp"/sglang-0.4.10-*.whl)" .whl/sglang_bench_serving.py
  rm -r "$tmp"
fi
ls -la .whl; du -sh .whl
