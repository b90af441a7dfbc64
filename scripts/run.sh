#!/usr/bin/env bash
# The main job: sets up, builds, and runs zmlx on a model. Without an
# argument it creates a small synthetic Qwen3-MoE model (seconds) and
# generates from it; pass a model directory or HF repo id to use your own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh zmlx
MODEL="${1:-}"
if [[ -z "$MODEL" ]]; then
  MODEL=models/qwen3-moe-tiny
  [[ -f "$MODEL/config.json" ]] || build/zmlx synth --arch qwen3_moe --preset tiny --out "$MODEL"
fi
build/zmlx inspect "$MODEL" | head -8
export EXO_ZMLX="${EXO_ZMLX:-1}"  # fused-kernel patches on, as the seed's launcher does
build/zmlx generate "$MODEL" --chat --prompt "${PROMPT:-Tell me about mixture-of-experts models.}" --max-tokens "${MAX_TOKENS:-64}"
