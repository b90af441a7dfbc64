#!/usr/bin/env bash
# The main job: sets up, builds, and starts the zmlx node (OpenAI-compatible
# API + chat dashboard) on http://localhost:52416 with fused-kernel patches on,
# as the seed's launcher does. Without an argument it serves a small synthetic
# Qwen3-MoE model it creates (seconds); pass a model directory or HF repo id
# to serve your own. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh zmlx
MODEL="${1:-}"
if [[ -z "$MODEL" ]]; then
  MODEL=models/qwen3-moe-tiny
  [[ -f "$MODEL/config.json" ]] || build/zmlx synth --arch qwen3_moe --preset tiny --out "$MODEL"
fi
export EXO_ZMLX="${EXO_ZMLX:-1}"  # fused-kernel patches on, as the seed's launcher does
exec build/zmlx serve "$MODEL" --api-port "${PORT:-52416}" --models-dir models
