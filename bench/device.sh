#!/usr/bin/env bash
# Runs on the GPU machine (see bench/device_bundle.sh): the GPU unit tests,
# then for each family's `full` synth model (real shapes, random weights):
# prefill/decode throughput patched and unpatched, sampled decode (T 0.7,
# top-p 0.95), `zmlx validate`, and prefill of long prompts (LONG tokens) in
# the GPU's default passes and in passes of 512, each then decoding GEN tokens
# (16 until 2026-11-29, which read lower than a 128-token decode), and
# prefill of short prompts (SHORT tokens: the experts over bucketed pairs),
# and decode after a 1-token prompt (llama-bench's tg128 starts empty).
# $OUT gets results.md and raw.tgz (every raw log and JSON): a device run
# brings back at most 8 files, so the raw files are packed into one.
#   STAGES="tests qwen3 lfm2 glm" (default: all; add "sanitize" for the GPU
#   tests under compute-sanitizer's memcheck, ~80 s, and racecheck on the
#   flash prefill kernels' tests)   RUNS=3   GEN=128   PROMPT=512
#   LONG="32768" (prompt lengths; empty: none)   LONG_CHUNKS="0 512" (passes; 0: the GPU's default)
#   SHORT="16 64 128" (short prompt lengths, prefill only; empty: none)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build-device}
export LD_LIBRARY_PATH="$PWD/$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT=${OUT:-/tmp/zmlx-device-out}
WORK=${WORK:-/tmp/zmlx-models}
STAGES=${STAGES:-tests qwen3 lfm2 glm}
RUNS=${RUNS:-3}; GEN=${GEN:-128}; PROMPT=${PROMPT:-512}; LONG=${LONG-32768}; LONG_CHUNKS=${LONG_CHUNKS-0 512}
SHORT=${SHORT-16 64 128}
RAW=$(mktemp -d)
mkdir -p "$OUT" "$WORK"
R="$OUT/results.md"
trap 'tar czf "$OUT/raw.tgz" -C "$RAW" . && rm -rf "$RAW"' EXIT
log() { echo "$*" | tee -a "$R"; }

log "# zmlx device run $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$R"
"$BIN/gpu_bandwidth" | tee -a "$R"

has() { [[ " $STAGES " == *" $1 "* ]]; }

gpu_tests() {  # title, binary, raw file name
  log "## $1"
  CUDA_CACHE_MAXSIZE=4294967296 timeout 420 "$BIN/$2" --gtest_filter='Cuda*' >"$RAW/$3" 2>&1
  log "exit $? — $(grep -E '^\[  (PASSED|FAILED) ' "$RAW/$3" | tr '\n' ' ')"
  grep -E 'FAILED|Failure|error' "$RAW/$3" | head -20 | tee -a "$R"
}
if has tests; then
  gpu_tests "GPU unit tests" zmlx_tests tests.txt
  # The sm_80 build's (SM80=1 bash bench/device_bundle.sh), when bundled: its
  # PTX is compiled for this card at load (the cache size holds it), and it
  # runs without PDL on its own, as on an A100 (pdl_enabled).
  [[ -x "$BIN/zmlx_tests80" ]] && gpu_tests "GPU unit tests, the sm_80 build (PTX compiled at load, no PDL)" \
    zmlx_tests80 tests80.txt
fi

if has sanitize; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  log "## compute-sanitizer"
  timeout 420 "$CS" --tool memcheck --print-limit 10 "$BIN/zmlx_tests" --gtest_filter='Cuda*' >"$RAW/memcheck.txt" 2>&1
  log "memcheck (exit $?): $(grep -E 'ERROR SUMMARY|^\[  (PASSED|FAILED) ' "$RAW/memcheck.txt" | tr '\n' ' ')"
  timeout 420 "$CS" --tool racecheck --print-limit 10 "$BIN/zmlx_tests" \
    --gtest_filter='CudaOps.AttentionDecodeAndPrefillMatchCpu:CudaOps.MlaFastKernelsMatchCpu:CudaOps.FlashPrefillOverManyTilesMatchesCpu' >"$RAW/racecheck.txt" 2>&1
  log "racecheck (exit $?): $(grep -E 'RACECHECK SUMMARY|^\[  (PASSED|FAILED) ' "$RAW/racecheck.txt" | tr '\n' ' ')"
fi

bench_family() {  # arch name
  local arch=$1 dir="$WORK/$1-full"
  log "## $arch full synth"
  [[ -f "$dir/config.json" ]] || timeout 300 "$BIN/zmlx" synth --arch "$arch" --preset full --out "$dir" >"$RAW/synth-$arch.txt" 2>&1
  "$BIN/zmlx" inspect "$dir" --json >"$RAW/inspect-$arch.json" 2>&1
  for mode in patch no-patch; do
    timeout 400 "$BIN/zmlx" bench "$dir" --backend cuda --$mode --prompt-tokens "$PROMPT" --gen-tokens "$GEN" \
      --runs "$RUNS" --json >"$RAW/bench-$arch-$mode.json" 2>"$RAW/bench-$arch-$mode.log"
    log "bench $arch --$mode (exit $?): $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('prefill %.0f tok/s, decode %.1f tok/s (min %.1f max %.1f), %.2f GB/token, %.0f GB/s' % (j['prefill_tps']['median'], j['decode_tps']['median'], j['decode_tps']['min'], j['decode_tps']['max'], j['bytes_per_token']/1e9, j['decode_gbps']))" "$RAW/bench-$arch-$mode.json" 2>&1 | tail -1)"
  done
  # Decode from a nearly empty context (a 1-token prompt): llama-bench's
  # tg128 measures from an empty one, so this is the like-for-like figure.
  timeout 400 "$BIN/zmlx" bench "$dir" --backend cuda --patch --prompt-tokens 1 --gen-tokens "$GEN" \
    --runs "$RUNS" --json >"$RAW/bench-$arch-depth0.json" 2>"$RAW/bench-$arch-depth0.log"
  log "bench $arch --patch --prompt-tokens 1 (exit $?): $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('decode %.1f tok/s (min %.1f max %.1f)' % (j['decode_tps']['median'], j['decode_tps']['min'], j['decode_tps']['max']))" "$RAW/bench-$arch-depth0.json" 2>&1 | tail -1)"
  # Sampled decoding (the sampler on the device, inside the recorded step).
  timeout 400 "$BIN/zmlx" bench "$dir" --backend cuda --patch --prompt-tokens "$PROMPT" --gen-tokens "$GEN" \
    --runs "$RUNS" --temp 0.7 --top-p 0.95 --seed 1 --json >"$RAW/bench-$arch-sampled.json" 2>"$RAW/bench-$arch-sampled.log"
  log "bench $arch --patch --temp 0.7 --top-p 0.95 (exit $?): $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('decode %.1f tok/s (min %.1f max %.1f)' % (j['decode_tps']['median'], j['decode_tps']['min'], j['decode_tps']['max']))" "$RAW/bench-$arch-sampled.json" 2>&1 | tail -1)"
  timeout 300 "$BIN/zmlx" validate "$dir" --backend cuda --max-tokens 64 --runs 3 >"$RAW/validate-$arch.txt" 2>&1
  log "validate $arch (exit $?):"
  tail -12 "$RAW/validate-$arch.txt" | tee -a "$R"
  for n in $LONG; do
    for chunk in $LONG_CHUNKS; do  # 0: the backend's choice
      timeout 300 "$BIN/zmlx" bench "$dir" --backend cuda --patch --prompt-tokens "$n" --gen-tokens "$GEN" --runs 1 \
        --prefill-chunk "$chunk" --json >"$RAW/bench-$arch-long-$n-$chunk.json" 2>"$RAW/bench-$arch-long-$n-$chunk.log"
      log "bench $arch --prompt-tokens $n --prefill-chunk $chunk (exit $?): $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('prefill %.0f tok/s in passes of %d, then decode %.1f tok/s, GPU peak %.2f GB' % (j['prefill_tps']['median'], j['prefill_chunk'], j['decode_tps']['median'], j['peak_device_bytes']/1e9))" "$RAW/bench-$arch-long-$n-$chunk.json" 2>&1 | tail -1)"
    done
  done
  for n in $SHORT; do
    timeout 120 "$BIN/zmlx" bench "$dir" --backend cuda --patch --prompt-tokens "$n" --gen-tokens 2 --warmup 1 \
      --runs "$RUNS" --json >"$RAW/bench-$arch-short-$n.json" 2>"$RAW/bench-$arch-short-$n.log"
    log "bench $arch --prompt-tokens $n (exit $?): $(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print('prefill %.0f tok/s (min %.0f max %.0f)' % (j['prefill_tps']['median'], j['prefill_tps']['min'], j['prefill_tps']['max']))" "$RAW/bench-$arch-short-$n.json" 2>&1 | tail -1)"
  done
  [[ "${KEEP_MODELS:-0}" == 1 ]] || rm -rf "$dir"
}
has qwen3 && bench_family qwen3_moe
has lfm2 && bench_family lfm2_moe
has glm && bench_family glm4_moe_lite
log "done $(date -u +%FT%TZ)"
