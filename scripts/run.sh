#!/usr/bin/env bash
# The main job: sets up, builds, and starts the zmlx node (OpenAI-compatible
# API + chat dashboard) on http://localhost:52416 with fused-kernel patches on,
# as the seed's launcher does. Without an argument it serves the small
# Qwen3-MoE model the project trained and ships (models-shipped/, see its
# MODEL_CARD.md); pass a model directory or HF repo id to serve your own.
# Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh zmlx
MODEL="${1:-models-shipped/zmlx-tiny-moe}"  # a small qwen3_moe trained by the project (tools/train_tiny)
export EXO_ZMLX="${EXO_ZMLX:-1}"  # fused-kernel patches on, as the seed's launcher does
exec build/zmlx serve "$MODEL" --api-port "${PORT:-52416}" --models-dir "${MODELS_DIR:-models-shipped}"
