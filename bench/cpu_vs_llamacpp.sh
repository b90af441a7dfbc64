#!/usr/bin/env bash
# Decode/prefill on this CPU: zmlx (unpatched and patched) and llama.cpp,
# back to back in one run, on models of the same shapes and bits per weight.
#   ZMLX_MODEL  a zmlx model dir (default: models/qwen3-full, made with
#               `zmlx synth --arch qwen3_moe --preset full`)
#   LLAMA_BENCH path to llama-bench, LLAMA_GGUF the random Q4_0 GGUF of
#               tools/llamacpp_baseline/make_random_gguf.py (skipped if unset)
set -euo pipefail
cd "$(dirname "$0")/.."
Z=build/zmlx
MODEL="${ZMLX_MODEL:-models/qwen3-full}"
P="${PROMPT_TOKENS:-64}"; N="${GEN_TOKENS:-32}"; R="${RUNS:-3}"
echo "# $(date -u +%F' '%T) UTC  $(lscpu | sed -n 's/^Model name: *//p')  $(nproc) cores"
build/read_bandwidth 2>/dev/null || true
if [[ -n "${LLAMA_BENCH:-}" && -n "${LLAMA_GGUF:-}" ]]; then
  echo "## llama.cpp"; "$LLAMA_BENCH" -m "$LLAMA_GGUF" -t "$(nproc)" -p "$P" -n "$N" -r "$R"
fi
for patch in 0 1; do
  echo "## zmlx EXO_ZMLX=$patch"
  EXO_ZMLX=$patch "$Z" bench "$MODEL" --prompt-tokens "$P" --gen-tokens "$N" --runs "$R" --warmup 1
done
