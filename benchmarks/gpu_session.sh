#!/usr/bin/env bash
# On the lent GPU machine: install (plus flashinfer from .whl/fi_site.tar.xz when carried),
# then run the named steps, writing everything (and session.log) under $OUT. Usage:
#   bash benchmarks/gpu_session.sh gemv decode1 profile conformance
# Steps:
#   attention_sweep        benchmarks/attention_sweep.py: Triton extend/decode launch configurations
#   prefill_backends       benchmarks/prefill_backends.py: long-prompt attention, Triton extend vs
#                          torch's flash and cuDNN SDPA and flashinfer's fa3 / fa2 (whole prompts,
#                          chunks on a prefix); PREFILL_CASES (e.g. whole_8k,chunk_on_24k) narrows
#   prefill_ab             the prefill rows side by side: cuda's default attention (long
#                          extends in cuDNN), then benchmarks/prefill_cudnn_rule.py's
#                          PREFILL_RULES (default: no_warm_up triton_chunks flash_prompts),
#                          then the default again
#   overlap_ab             the offline rows (OVERLAP_WORKLOADS, default llama8b_offline and
#                          qwen3moe_offline) under benchmarks/overlap_rule.py sync_when_waiting:
#                          decode steps chain only while nothing waits (the rule before
#                          2026-12-05); run `h200` in the same call for the default
#   moe_decode             benchmarks/moe_decode_sweep.py: few-token fused MoE, paths and tiles
#   moe_w4                 benchmarks/moe_w4_sweep.py: the 4-bit (w4a16) expert decode kernels'
#                          launch shapes next to the bf16 decode kernels
#   decode_chain           benchmarks/decode_chain.py: each model's one-row linears and fused MoE
#                          decode kernels replayed as a decode graph runs them, per launch shape
#                          and per GEMV rule (CHAIN_ARGS adds options, e.g. --budget-s 150)
#   gemv_ab                the batch-1 decode rows (GEMV_WORKLOADS, default all four models) under
#                          each of benchmarks/gemv_rule.py's GEMV_RULES (default: default
#                          previous) -> $OUT/gemv/<rule>.json
#   deepseek_ab            the DeepSeek decode row (DEEPSEEK_WORKLOADS, default
#                          deepseek_v2_lite_decode1) under each of benchmarks/deepseek_rule.py's
#                          DEEPSEEK_RULES (default: default bmm routing_before default)
#                          -> $OUT/deepseek/<rule>[_again].json
#   prologue_ab            each decode row of PROLOGUE_WORKLOADS (default: qwen3moe_decode1
#                          llama8b_decode1) under each of benchmarks/prologue_rule.py's
#                          PROLOGUE_RULES (default: default prologue_off), a process each
#                          -> $OUT/prologue/<workload>-<rule>.json
#   moe_tune               benchmarks/moe_tune.py: the grouped MoE GEMM's tiles per expert shape
#                          and token count; installs platforms/triton/moe_tuned/<device>.json
#                          (copied to $OUT) for the later steps; TUNE_ARGS adds options
#   moe_ab                 the MoE rows (MOE_WORKLOADS, default qwen3moe) by default, then under
#                          benchmarks/moe_rule.py's MOE_RULES (default: torch_align_heuristic
#                          heuristic) -> $OUT/moe/<rule>.json
#   gemv, gemv_fused       benchmarks/gemv_sweep.py, benchmarks/gemv_fused_sweep.py
#   fp8_gemm               benchmarks/fp8_gemm_sweep.py: fp8 Triton GEMMs vs cuBLASLt scaled fp8
#                          vs bf16 at Llama-3.1-8B shapes and 16-8192 rows
#   fp8_tiles              benchmarks/fp8_block_tiles.py: tiles of the Triton fp8-block GEMM vs
#                          cuBLASLt's block-scaled fp8 and bf16 at 256 / 2048 / 8192 rows
#   moe_fp8                benchmarks/moe_fp8_bench.py: fused_moe with fp8_block experts vs bf16
#                          (Qwen3-30B-A3B, DeepSeek-V3 tp8 rank), T = 1..4096, with errors;
#                          MOE_FP8_ARGS adds options (--decode-fold 16), MOE_FP8_TAG names the file
#   fi_build_decode, fi_build_llama, fi_build_all
#                          benchmarks/flashinfer_jit_warmup.py, a ninja per module: the flashinfer
#                          modules of the conformance grid's decode cases / of the bf16
#                          head-128 cases a Llama-8B engine uses / of every case (WARMUP_ARGS
#                          narrows fi_build_all)
#   fi_mla                 flashinfer MLA (needs .whl/fi_site.tar.xz: benchmarks/flashinfer_site.sh
#                          on the host): its JIT modules built once (benchmarks/
#                          flashinfer_mla_warmup.py, SIGINT at FI_MLA_BUILD_TIMEOUT, default 300 s,
#                          or DEADLINE; a decode checked against torch-native) -> $OUT/fi_mla/
#                          build.json; cuda conformance -k "$FI_MLA_CONF_K" (default "mla and flashinfer";
#                          SIGINT at CONF_TIMEOUT, default 240 s, still writes the report) ->
#                          $OUT/conf_fi_mla; the DeepSeek-V2-Lite batch-1 decode row with
#                          --kernel mla_attention=flashinfer, then the default -> $OUT/fi_mla/
#                          deepseek_{flashinfer,default}.json (~10 min cold)
#   conf_full              cuda conformance in CONF_WORKERS pytest-xdist workers; CONF_FILTER is
#                          a -k expression; SIGINT at CONF_TIMEOUT still writes the report
#                          (marked INCOMPLETE); a test past CONF_TEST_TIMEOUT (default 300 s)
#                          fails (needs pytest-timeout: carry its wheel in .whl)
#   conformance, conf_triton, conf_flashinfer, conf_changed
#                          cuda conformance: all / not flashinfer / flashinfer bf16 head 128 /
#                          the ops a kernel change touches
#   decode1                batch-1 decode: default kernels, then cuBLAS linears
#   decode1_only           batch-1 decode, default kernels
#   decode1_variants       batch-1 decode without PDL, with the prologue-fused GEMVs, defaults
#   decode1_flashinfer     batch-1 decode with flashinfer attention, then the defaults
#   profile                batch-1 decode profile
#   profile_model          decode profiles of PROFILE_MODELS (folders of benchmarks/models, default
#                          qwen3-30b-a3b) at PROFILE_BATCHES (default 1,256): benchmarks/profile_llama8b.py
#   profile_prefill        long-prompt prefill profile, PREFILL_LENS tokens (benchmarks/profile_prefill.py)
#   bench_rest, bench      bench_llama8b.py: throughput + shared_prefix + hf / every workload
#   quant_gemv             benchmarks/quant_gemv_sweep.py --sweep: each quantized GEMV over its launch
#                          shapes at Llama-3.1-8B's layers (QGEMV_SCHEMES, default awq_w4a16)
#   w4_gemm                benchmarks/w4_gemm_sweep.py: 4-bit linears at 16-8192 rows, Triton
#                          dequantizing GEMM vs dequantize + cuBLAS vs bf16 cuBLAS
#   w8_ab                  the W8A8 batch-1 decode rows (W8_FORMATS, default fp8_block,
#                          ct_fp8_tensor, ct_w8a8_int8; no offline run) under each of
#                          benchmarks/w8_rule.py's W8_RULES (default: default rows16 default)
#                          -> $OUT/w8/<rule>[_again]/quant_llama8b.json
#   w4_tma                 benchmarks/w4_tma_sweep.py: the one-row 4-bit GEMV through the TMA
#                          pipeline over its launch grid against the register-tile kernel
#                          -> $OUT/w4_tma.json (+ .png); w4_ab's rule `tma` reads it
#   w4_ab                  the W4A16 batch-1 decode row (compressed-tensors W4A16; no offline run)
#                          under each of benchmarks/w4_rule.py's W4_RULES (default: default
#                          tiles32k default) -> $OUT/w4/<rule>[_again]/quant_llama8b.json
#   fp8fi                  flashinfer's sm90 fp8 block-scale GEMM (needs .whl/fi_site.tar.xz; with the
#                          module and the DeepGEMM tiles prebuilt by benchmarks/flashinfer_aot.sh
#                          on the host, .whl/deepgemm_cubins.tar.xz, nothing compiles): module load +
#                          probe, benchmarks/fp8_block_deepgemm.py (FP8FI_ROWS) and its cuda
#                          conformance (FP8FI_SWEEP=0 skips both), then the offline rows per
#                          FP8FI_RULES (benchmarks/fp8_mm_rule.py; default: default cublas): FP8FI_FORMATS (default bf16,fp8_block), a
#                          flashinfer* rule fp8_block with HS_KERNELS=linear.fp8_block=flashinfer,
#                          cublas fp8_block with linear.fp8_block=triton -> $OUT/fp8fi/
#   fp8mm_ab               the fp8 offline rows (FP8MM_FORMATS, default bf16,fp8_block,ct_fp8_tensor;
#                          FP8MM_PROMPTS prompts, default 256) under each of
#                          benchmarks/fp8_mm_rule.py's FP8MM_RULES (default: default fast
#                          swap4096) -> $OUT/fp8mm/<rule>[_again]/quant_llama8b.json
#   quant                  bench_quant_llama8b.py: bf16 / fp8-block / ct-fp8 / w8a8-int8 / w4a16
#                          batch-1 decode vs roofline and throughput (QUANT_ARGS adds options)
#   triton_tests, tests    tests/triton compiled / plus model and scheduler parity on the GPU
#                          (TEST_PATHS narrows `tests`, TEST_FILTER is a -k expression); the
#                          whole log, tracebacks of failures included, -> $OUT/<step>.log
#   sglang_bench_serving   `heteroserve serve` of the Llama-3.1-8B shape (dummy weights, a word-level
#                          tokenizer of its vocabulary: benchmarks/word_tokenizer.py; SERVE_ARGS adds
#                          server flags, e.g. "--quantization fp8") measured by SGLang's own
#                          bench_serving client (.whl/sglang_bench_serving.py from
#                          benchmarks/http_wheels.sh, not part of the repository): backends
#                          SERVING_BACKENDS (default vllm and sglang-oai), random-ids 1024 in / 256
#                          out, max-concurrency SERVING_LEVELS (default "1 16 64")
#   http                   benchmarks/bench_http.py: heteroserve serve at concurrency 1/16/64/256
#                          next to the offline Engine (needs the server's wheels in .whl: run
#                          benchmarks/http_wheels.sh on the host first)
#   clients                tests/server/test_openai_client.py and test_sglang_bench_serving.py against
#                          a cuda server: the openai client, SGLang's bench_serving (their wheels and
#                          .whl/sglang_bench_serving.py: benchmarks/http_wheels.sh) -> $OUT/clients/
#   tree_ab                the `h200` step under each older tree carried as .whl/tree-<rev>.tgz, then
#                          under this tree (H200_ARGS narrows both, e.g. "--workloads qwen3moe_offline")
#                          -> $OUT/tree_ab/<rev>/, $OUT/tree_ab/this/. On the host:
#                          git archive --format=tar.gz -o .whl/tree-REV.tgz REV -- . ':!benchmarks/results' ':!docs'
#   h200                   benchmarks/bench_headline.py: every issue-17 workload next to its floor
#                          -> $OUT/h200-latest.json, h200-latest-<workload>.json/.png (< 9 min);
#                          H200_ARGS adds options (e.g. --profile qwen3moe_decode1), HS_COMMIT
#                          names the commit (the copy here has no .git)
# DEADLINE (seconds after this script starts) caps the fi_build and conf_full limits; a step
# cut there may take 30 s more to stop, so keep DEADLINE that far under the call's limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1  # the log survives a call cut off at its time limit
# flashinfer's JIT cache inside the (ignored) checkout, so a warm machine keeps it between calls
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-$PWD/.fi_cache}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
if [ -f .whl/fi_site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/fi_site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
fi
# the DeepGEMM tiles of the cuda fp8_block linear (flashinfer's block-scale GEMM): found here,
# compiled with nvcc when new; .whl/deepgemm_cubins.tar.xz holds those benchmarks/
# flashinfer_aot.sh built on the host
export TRTLLM_DG_CACHE_DIR=${TRTLLM_DG_CACHE_DIR:-$PWD/.fi_cache/deep_gemm}
mkdir -p "$TRTLLM_DG_CACHE_DIR"
[ -f .whl/deepgemm_cubins.tar.xz ] && tar xJf .whl/deepgemm_cubins.tar.xz -C "$TRTLLM_DG_CACHE_DIR"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
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
# $1 seconds, or fewer if DEADLINE (seconds after the start of this script) comes first
deadline_cap() {
  local left=$(( ${DEADLINE:-999999} - ($(date +%s) - t0) ))
  (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"
}
# flashinfer JIT modules of the conformance grid (benchmarks/flashinfer_jit_warmup.py); SIGINT
# at WARMUP_TIMEOUT (or DEADLINE) lets ninja keep the objects it finished
fi_build() {
  local name=$1 limit=${WARMUP_TIMEOUT:-400}; shift
  limit=$(deadline_cap "$limit")
  timeout -s INT -k 20 "$limit" python3 benchmarks/flashinfer_jit_warmup.py "$@" \
    --out "$OUT/fi_build_$name.json" 2>&1 | grep -v -i warn | cut -c1-200
}
# `heteroserve serve` of the Llama-3.1-8B shape on port 30010 in the background; waits for /health
serve_llama8b() {
  python3 benchmarks/word_tokenizer.py /tmp/wt --vocab-size 128256 >/dev/null
  heteroserve serve --model-path benchmarks/models/llama-3.1-8b --load-format dummy \
    --tokenizer-path /tmp/wt --platform cuda --port 30010 --served-model-name llama8b \
    --disable-access-log --log-level warning "$@" > "$OUT/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:30010/health >/dev/null && { stamp "server ready"; return 0; }
    kill -0 $SERVE_PID 2>/dev/null || { tail -20 "$OUT/serve.log"; return 1; }
    sleep 1
  done
  return 1
}
sglang_bench_serving() {
  serve_llama8b ${SERVE_ARGS:-} || return
  for backend in ${SERVING_BACKENDS:-vllm sglang-oai}; do
    for mc in ${SERVING_LEVELS:-1 16 64}; do
      n=$(( mc == 1 ? 16 : 4 * mc ))
      timeout 240 python3 .whl/sglang_bench_serving.py --backend $backend \
        --base-url http://127.0.0.1:30010 --model llama8b --tokenizer /tmp/wt \
        --dataset-name random-ids --random-input-len 1024 --random-output-len 256 \
        --random-range-ratio 1 --num-prompts $n --max-concurrency $mc --seed 1 \
        --output-file "$OUT/sglang_bench_serving.jsonl" --disable-tqdm 2>&1 \
        | grep -E "Backend|Max request concurrency|Successful|Output token throughput|Median TTFT|P99 TTFT|Median ITL|P99 ITL|Median TPOT|Error|Traceback"
    done
  done
  kill -TERM $SERVE_PID; wait $SERVE_PID; stamp "server exit code $?"
}
for step in "$@"; do
  stamp "== $step =="
  case $step in
    gemv) timeout 200 python3 benchmarks/gemv_sweep.py --out "$OUT/gemv.json" ;;
    fp8_gemm) timeout 200 python3 benchmarks/fp8_gemm_sweep.py --out "$OUT/fp8_gemm.json" 2>&1 \
        | grep -v -i warn ;;
    fp8_tiles) timeout "${TILES_TIMEOUT:-300}" python3 benchmarks/fp8_block_tiles.py \
        --out "$OUT/fp8_block_tiles.json" ${TILES_ARGS:-} 2>&1 | grep -v -i warn ;;
    prefill_backends)  # PREFILL_CASES narrows the cases; flashinfer's variants JIT-build
      command -v ninja >/dev/null || export PATH=/tmp/site/fi_bin:$PATH  # ninja from fi_site
      timeout "${PREFILL_TIMEOUT:-300}" python3 benchmarks/prefill_backends.py \
        --out "$OUT/prefill_backends.json" ${PREFILL_CASES:+--cases "$PREFILL_CASES"} 2>&1 \
        | grep -v -i warn | cut -c1-220 ;;
    prefill_ab)
      pf="benchmarks/bench_headline.py --workloads llama8b_prefill --out $OUT/pf"
      timeout 150 python3 $pf/default.json 2>&1 | grep -E "prefill_"
      for rule in ${PREFILL_RULES:-no_warm_up triton_chunks flash_prompts}; do
        timeout 150 python3 benchmarks/prefill_cudnn_rule.py $rule --out "$OUT/pf/$rule.json" \
          2>&1 | grep -E "prefill_"
      done
      timeout 150 python3 $pf/default_again.json 2>&1 | grep -E "prefill_" ;;
    overlap_ab)  # the offline rows under the chaining rule before admission_blocked
      timeout 300 python3 benchmarks/overlap_rule.py sync_when_waiting --workloads \
        "${OVERLAP_WORKLOADS:-llama8b_offline,qwen3moe_offline}" \
        --out "$OUT/ov/sync_when_waiting.json" 2>&1 | grep -E "offline|wrote" ;;
    moe_decode) timeout 200 python3 benchmarks/moe_decode_sweep.py --out "$OUT/moe_decode.json" \
        2>&1 | grep -v -i warn ;;
    moe_w4) timeout "${MOE_W4_TIMEOUT:-240}" python3 benchmarks/moe_w4_sweep.py \
        --out "$OUT/moe_w4_sweep.json" 2>&1 | grep -v -i warn ;;
    moe_tune) HS_COMMIT=${HS_COMMIT:-} timeout "${TUNE_TIMEOUT:-420}" python3 benchmarks/moe_tune.py \
        --out "$OUT/moe_tune.json" ${TUNE_ARGS:-} 2>&1 | grep -v -i warn
      cp platforms/triton/moe_tuned/*.json "$OUT/" 2>/dev/null ;;
    moe_ab)  # the MoE rows under each rule (MOE_RULES, `default` among them), each in a process
      # of its own; a rule named twice runs twice
      mkdir -p "$OUT/moe"
      for rule in ${MOE_RULES:-default heuristic default}; do
        name=$rule; [ -f "$OUT/moe/$name.json" ] && name=${rule}_again
        timeout 200 python3 benchmarks/moe_rule.py $rule --workloads "${MOE_WORKLOADS:-qwen3moe}" \
          --out "$OUT/moe/$name.json" 2>&1 | grep -E "qwen3moe_|deepseek_|wrote|Error"
      done ;;
    decode_chain) timeout 400 python3 benchmarks/decode_chain.py --out "$OUT/decode_chain.json" \
        ${CHAIN_ARGS:-} 2>&1 | grep -v -i warn ;;
    gemv_ab)  # the decode rows under each GEMV launch rule, the default first
      mkdir -p "$OUT/gemv"
      for rule in ${GEMV_RULES:-default previous}; do
        timeout 150 python3 benchmarks/gemv_rule.py "$rule" --workloads \
          "${GEMV_WORKLOADS:-llama8b_decode1,qwen3moe_decode1,deepseek_v2_lite_decode1,gemma3_12b_decode1}" \
          --out "$OUT/gemv/$rule.json" 2>&1 | grep -E "decode1:|wrote|Error"
      done ;;
    deepseek_ab)  # the DeepSeek row under each decode path; a rule named twice runs twice
      mkdir -p "$OUT/deepseek"
      for rule in ${DEEPSEEK_RULES:-default bmm routing_before default}; do
        name=$rule; [ -f "$OUT/deepseek/$name.json" ] && name=${rule}_again
        timeout 150 python3 benchmarks/deepseek_rule.py "$rule" --workloads \
          "${DEEPSEEK_WORKLOADS:-deepseek_v2_lite_decode1}" --out "$OUT/deepseek/$name.json" \
          2>&1 | grep -E "decode1:|offline:|wrote|Error"
      done ;;
    prologue_ab)  # the decode rows with q/k norm + rotary in the split kernel or launched apart
      mkdir -p "$OUT/prologue"
      # (each workload in a process of its own: a rule is installed in its process only)
      for wl in ${PROLOGUE_WORKLOADS:-qwen3moe_decode1 llama8b_decode1}; do
        for rule in ${PROLOGUE_RULES:-default prologue_off}; do
          name=$wl-$rule; [ -f "$OUT/prologue/$name.json" ] && name=$wl-${rule}_again
          timeout 150 python3 benchmarks/prologue_rule.py "$rule" --workloads "$wl" \
            --out "$OUT/prologue/$name.json" 2>&1 | grep -E "decode1:|wrote|Error"
        done
      done ;;
    w8_ab)  # the W8A8 decode rows under each one-row GEMV launch rule; a rule named twice runs twice
      for rule in ${W8_RULES:-default rows16 default}; do
        name=$rule; [ -d "$OUT/w8/$name" ] && name=${rule}_again
        timeout 150 python3 benchmarks/w8_rule.py "$rule" --num-prompts 0 \
          --formats "${W8_FORMATS:-fp8_block,ct_fp8_tensor,ct_w8a8_int8}" \
          --out-dir "$OUT/w8/$name" 2>&1 | grep -E "decode1|FAILED|Error"
      done ;;
    fp8fi)  # flashinfer's sm90 fp8 block-scale GEMM: module build + probe, the per-layer sweep,
      # its cuda conformance, then the offline rows with the default fp8_block linear and with it
      command -v ninja >/dev/null || export PATH=/tmp/site/fi_bin:$PATH  # ninja from fi_site
      mkdir -p "$OUT/fp8fi"
      echo "nvcc for new DeepGEMM tiles: $(command -v nvcc || echo none on PATH), CUDA_HOME=${CUDA_HOME:-}"
      timeout -s INT -k 20 "$(deadline_cap "${FP8FI_BUILD_TIMEOUT:-400}")" python3 -c "
import time, torch; t = time.time()
from heteroserve.platforms.cuda.flashinfer_fp8_block import unavailable
print('flashinfer fp8 block-scale GEMM:', unavailable(torch.device('cuda')) or 'ready',
      f'({time.time() - t:.0f} s: module build, load, probe)')" 2>&1 | grep -v -i warn | tail -3
      if [ "${FP8FI_SWEEP:-1}" = 1 ]; then
        timeout "${FP8FI_SWEEP_TIMEOUT:-300}" python3 benchmarks/fp8_block_deepgemm.py \
          --out "$OUT/fp8fi/fp8_block_deepgemm.json" ${FP8FI_ROWS:+--rows "$FP8FI_ROWS"} 2>&1 \
          | grep -v -i warn
        timeout "${CONF_TIMEOUT:-200}" heteroserve conformance --platform cuda \
          --report "$OUT/fp8fi/conf" -- -q -p no:cacheprovider -k "fp8_block and flashinfer" \
          2>&1 | tail -6
      fi
      for rule in ${FP8FI_RULES:-default cublas}; do
        name=$rule; [ -d "$OUT/fp8fi/$name" ] && name=${rule}_again
        kernels=""; formats=${FP8FI_FORMATS:-bf16,fp8_block}  # an override needs its op wanted
        case $rule in
          flashinfer*) kernels=linear.fp8_block=flashinfer; formats=fp8_block ;;
          cublas) kernels=linear.fp8_block=triton; formats=fp8_block ;;
        esac
        HS_KERNELS=$kernels timeout "${FP8MM_TIMEOUT:-200}" python3 benchmarks/fp8_mm_rule.py \
          "$rule" --num-prompts "${FP8MM_PROMPTS:-256}" --formats "$formats" \
          --out-dir "$OUT/fp8fi/$name" 2>&1 | grep -E "decode1|throughput|total|FAILED|Error"
      done ;;
    fp8mm_ab)  # the fp8 offline rows under each cuBLASLt call rule; a rule named twice runs twice
      for rule in ${FP8MM_RULES:-default fast swap4096}; do
        name=$rule; [ -d "$OUT/fp8mm/$name" ] && name=${rule}_again
        timeout "${FP8MM_TIMEOUT:-200}" python3 benchmarks/fp8_mm_rule.py "$rule" \
          --num-prompts "${FP8MM_PROMPTS:-256}" \
          --formats "${FP8MM_FORMATS:-bf16,fp8_block,ct_fp8_tensor}" \
          --out-dir "$OUT/fp8mm/$name" 2>&1 | grep -E "decode1|throughput|total|FAILED|Error"
      done ;;
    w4_ab)  # the W4A16 decode row under each one-row 4-bit GEMV launch rule
      for rule in ${W4_RULES:-default tiles32k default}; do
        name=$rule; [ -d "$OUT/w4/$name" ] && name=${rule}_again
        W4_TMA_TABLE=${W4_TMA_TABLE:-$OUT/w4_tma.json} \
        timeout 150 python3 benchmarks/w4_rule.py "$rule" --num-prompts 0 --formats ct_w4a16 \
          --out-dir "$OUT/w4/$name" 2>&1 | grep -E "decode1|FAILED|Error"
      done ;;
    w4_tma) timeout "${W4_TMA_TIMEOUT:-300}" python3 benchmarks/w4_tma_sweep.py --plot ${W4_TMA_ARGS:-} \
        --out "$OUT/w4_tma.json" 2>&1 | grep -v -i warn ;;
    attention_sweep) timeout 400 python3 benchmarks/attention_sweep.py --out "$OUT/attention_sweep.json" \
        ${SWEEP_ARGS:-} 2>&1 | grep -v -i warn ;;
    moe_fp8) timeout 300 python3 benchmarks/moe_fp8_bench.py --out "$OUT/moe_fp8${MOE_FP8_TAG:-}.json" \
        ${MOE_FP8_ARGS:-} 2>&1 | grep -v -i warn ;;
    gemv_fused) timeout 200 python3 benchmarks/gemv_fused_sweep.py --out "$OUT/gemv_fused.json" ;;
    fi_build_decode) fi_build decode --kind decode ;;
    fi_build_llama) fi_build llama --kind extend --kind decode --only bf16-p1-h8:2-d128 ;;
    fi_build_all) fi_build all ${WARMUP_ARGS:-} ;;  # WARMUP_ARGS: e.g. --kind extend --only bf16
    fi_mla)  # flashinfer MLA: JIT build, MLA conformance, DeepSeek decode next to the default
      command -v ninja >/dev/null || export PATH=/tmp/site/fi_bin:$PATH  # ninja from fi_site
      mkdir -p "$OUT/fi_mla"
      timeout -s INT -k 20 "$(deadline_cap "${FI_MLA_BUILD_TIMEOUT:-300}")" python3 \
        benchmarks/flashinfer_mla_warmup.py --out "$OUT/fi_mla/build.json" 2>&1 \
        | grep -v -i warn | cut -c1-200
      timeout -s INT -k 30 "$(deadline_cap "${CONF_TIMEOUT:-240}")" heteroserve conformance \
        --platform cuda --report "$OUT/conf_fi_mla" -- -q -p no:cacheprovider -k "${FI_MLA_CONF_K:-mla and flashinfer}" 2>&1 \
        | tail -15
      for kernels in mla_attention=flashinfer ""; do
        name=${kernels:+flashinfer}; name=${name:-default}
        HS_KERNELS=$kernels timeout 200 python3 benchmarks/bench_headline.py --workloads \
          deepseek_v2_lite_decode1 --out "$OUT/fi_mla/deepseek_$name.json" 2>&1 \
          | grep -E "decode1:|wrote|Error"
      done ;;
    conf_full)
      limit=$(deadline_cap "${CONF_TIMEOUT:-520}")  # a full run: 420-470 s in 14-16 workers
      timeout -s INT -k 30 "$limit" heteroserve conformance --platform cuda \
        --test-timeout "${CONF_TEST_TIMEOUT:-300}" --report "$OUT/full" -- -q -rf -p no:cacheprovider --dist load \
        -n "${CONF_WORKERS:-12}" ${CONF_FILTER:+-k "$CONF_FILTER"} 2>&1 | tail -40 ;;
    decode1) decode1 default; HS_KERNELS=linear.unquantized=torch_native decode1 cublas ;;
    decode1_only) decode1 default ;;
    decode1_flashinfer) HS_KERNELS=attention=flashinfer decode1 flashinfer; decode1 default ;;
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
    profile_model) for m in ${PROFILE_MODELS:-qwen3-30b-a3b}; do
        HS_MODEL_DIR=benchmarks/models/$m HS_GRAPH_MAX_BS=256 timeout 200 \
        python3 benchmarks/profile_llama8b.py ${PROFILE_BATCHES:-1,256} > "$OUT/profile_$m.txt" 2>&1
        grep -A18 "== decode" "$OUT/profile_$m.txt" | cut -c1-70,150-200; done ;;
    profile_prefill) timeout 200 python3 benchmarks/profile_prefill.py ${PREFILL_LENS:-8192,32768} \
        > "$OUT/profile_prefill.txt" 2>&1; grep -A20 "== prefill" "$OUT/profile_prefill.txt" | cut -c1-75,150-200 ;;
    conf_k) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/conf_k" -- -q -p no:cacheprovider -k "${CONF_K:?CONF_K: a -k expression}" \
        2>&1 | tail -15 ;;
    conformance) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT" -- -q -p no:cacheprovider 2>&1 | tail -15 ;;
    conf_triton) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/triton" -- -q -p no:cacheprovider -k "not flashinfer" 2>&1 | tail -22 ;;
    conf_flashinfer) timeout "${CONF_TIMEOUT:-300}" heteroserve conformance --platform cuda \
        --report "$OUT/flashinfer" -- -q -p no:cacheprovider \
        -k "flashinfer and (bf16 or not attention) and (d128 or not attention)" 2>&1 | tail -12 ;;
    triton_tests) timeout 200 python3 -m pytest tests/triton -q -p no:cacheprovider -rf \
        --tb=short ${TEST_FILTER:+-k "$TEST_FILTER"} > "$OUT/triton_tests.log" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/triton_tests.log" | tail -12 ;;
    tests) HETEROSERVE_TEST_PLATFORM=cuda timeout 240 python3 -m pytest ${TEST_PATHS:-tests/triton \
        tests/models tests/scheduler} -q -p no:cacheprovider -rf --tb=short \
        ${TEST_FILTER:+-k "$TEST_FILTER"} > "$OUT/tests.log" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12 ;;
    quant_gemv) timeout 300 python3 benchmarks/quant_gemv_sweep.py --sweep \
        --schemes "${QGEMV_SCHEMES:-awq_w4a16}" --out "$OUT/quant_gemv.json" 2>&1 | grep -vi warn ;;
    w4_gemm) timeout 300 python3 benchmarks/w4_gemm_sweep.py --out "$OUT/w4_gemm.json" ${W4_ARGS:-} 2>&1 \
        | grep -vi warn ;;
    quant) timeout "${BENCH_TIMEOUT:-470}" python3 benchmarks/bench_quant_llama8b.py \
        --out-dir "$OUT" ${QUANT_ARGS:-} 2>&1 | grep -vi warn ;;
    bench) timeout 560 python3 benchmarks/bench_llama8b.py --out "$OUT/bench.json" 2>&1 \
        | grep -vi warn ;;
    sglang_bench_serving) sglang_bench_serving ;;
    http) timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/bench_http.py --out-dir "$OUT" \
        2>&1 | grep -v -i warn ;;
    clients)  # a failing test leaves the session going: pytest's exit code goes to the log
      python3 -m pip install -q --no-index --no-compile --no-cache-dir --upgrade --target /tmp/site \
        --find-links .whl openai aiohttp requests httpx 2>&1 | tail -2 && export PYTHONPATH=/tmp/site
      mkdir -p "$OUT/clients"
      HETEROSERVE_SGLANG_BENCH=$PWD/.whl/sglang_bench_serving.py HETEROSERVE_TEST_PLATFORM=cuda \
        timeout "${CLIENTS_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider \
        tests/server/test_openai_client.py tests/server/test_sglang_bench_serving.py \
        --junitxml "$OUT/clients/junit.xml" 2>&1 | tee "$OUT/clients/pytest.log" | tail -25
      stamp "clients: pytest exit code ${PIPESTATUS[0]}" ;;
    tree_ab)  # each carried tree installs itself (its own gpu_session.sh), this one last
      for tgz in .whl/tree-*.tgz; do
        [ -f "$tgz" ] || { echo "tree_ab: no .whl/tree-*.tgz carried"; break; }
        rev=$(basename "$tgz" .tgz); rev=${rev#tree-}
        mkdir -p "/tmp/tree-$rev" "$OUT/tree_ab/$rev" && tar xzf "$tgz" -C "/tmp/tree-$rev" \
          && ln -sfn "$PWD/.whl" "/tmp/tree-$rev/.whl"
        (cd "/tmp/tree-$rev" && OUT="$OUT/tree_ab/$rev" HS_COMMIT=$rev bash benchmarks/gpu_session.sh h200)
      done
      mkdir -p "$OUT/tree_ab/this"
      OUT="$OUT/tree_ab/this" bash benchmarks/gpu_session.sh h200 ;;
    h200) timeout "${BENCH_TIMEOUT:-560}" python3 benchmarks/bench_headline.py \
        --process-per-model --out "$OUT/h200-latest.json" ${H200_ARGS:-} 2>&1 | grep -v -i warn ;;
    *) echo "unknown step $step" ;;
  esac
done
stamp "done"
ls -la "$OUT"
