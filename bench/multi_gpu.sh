#!/usr/bin/env bash
# Multi-GPU throughput (run on a machine with at least 2 GPUs): for the full
# synth models of qwen3_moe and glm4_moe_lite (real shapes, random weights),
# `zmlx bench --backend cuda` on one GPU, then 2 GPU ranks over NCCL with
# --parallel pipeline and --parallel tensor (fused patches on everywhere).
# Writes a markdown table to $OUT/results.md and the raw JSON and logs to
# $OUT/raw.tar.gz (two files: a device run brings back only a few). Synth and
# bench of one family take minutes: FAMILIES=qwen3_moe, then glm4_moe_lite,
# keeps each call short (the table is appended to; the models stay in $WORK).
#   BIN=build-device  OUT=/tmp/zmlx-multi-gpu-out  WORK=/tmp/zmlx-models
#   FAMILIES="qwen3_moe glm4_moe_lite"  PROMPT=512  GEN=128  RUNS=3
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build-device}
ZMLX="$(realpath "$BIN/zmlx")"
export LD_LIBRARY_PATH="$PWD/$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
OUT=${OUT:-/tmp/zmlx-multi-gpu-out}
WORK=${WORK:-/tmp/zmlx-models}
FAMILIES=${FAMILIES:-qwen3_moe glm4_moe_lite}
PROMPT=${PROMPT:-512}; GEN=${GEN:-128}; RUNS=${RUNS:-3}
RAW="$OUT/raw"
mkdir -p "$OUT" "$RAW" "$WORK"
R="$OUT/results.md"

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if (( gpus < 2 )); then echo "skip: $gpus GPU(s) visible, this benchmark needs 2" | tee "$R"; exit 0; fi
command -v mpirun >/dev/null || { echo "skip: no mpirun" | tee "$R"; exit 0; }
# libnccl: the nvidia-nccl Python wheel's when there is one (PyTorch's, usually
# newer than the system package), else the system's. The tensor-parallel
# decode all-reduce runs on NCCL's device API only where the library loaded
# is the version zmlx was compiled against (it says so otherwise).
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[[ -n "$nccl_lib" && -f "$nccl_lib/libnccl.so.2" ]] && export LD_LIBRARY_PATH="$nccl_lib:$LD_LIBRARY_PATH"
export ZMLX_NCCL_DEVICE_ALLREDUCE=${ZMLX_NCCL_DEVICE_ALLREDUCE:-1}  # 0: ncclAllReduce (A/B runs)
export ZMLX_TP_FUSED_NORM=${ZMLX_TP_FUSED_NORM:-1}  # 0: all-reduce and add+RMSNorm apart (A/B runs)
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on shared machines
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np 2 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x ZMLX_NCCL_DEVICE_ALLREDUCE -x ZMLX_TP_FUSED_NORM)

[[ -f "$R" ]] || {
  echo "# zmlx multi-GPU bench $(date -u +%FT%TZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=index,name,memory.total --format=csv
  nvidia-smi topo -m 2>/dev/null | head -4
  echo '```'
  echo
  echo "prompt $PROMPT tokens, $GEN generated, median of $RUNS runs, fused patches on, --backend cuda."
  echo "GPU memory is rank 0's peak (weights + buffers)."
  echo
  echo "| model | ranks | prefill tok/s | decode tok/s (min–max) | rank 0 GPU memory | note |"
  echo "|---|---|---|---|---|---|"
} > "$R"
[[ -f "$OUT/raw.tar.gz" ]] && tar xzf "$OUT/raw.tar.gz" -C "$OUT"

# row FAMILY LABEL JSON LOG EXIT
row() {
  python3 - "$@" >> "$R" <<'PY'
import json, re, sys
fam, label, js, log, rc = sys.argv[1:6]
try:
    j = json.load(open(js))
    p, d = j["prefill_tps"], j["decode_tps"]
    print(f"| {fam} | {label} | {p['median']:.0f} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) "
          f"| {j.get('peak_device_bytes', 0) / 1e9:.1f} GB | {j.get('parallel', '')} |")
except Exception:
    err = [l for l in open(log, errors="replace") if "error" in l]
    why = re.sub(r"\s+", " ", err[0]).strip()[:160] if err else f"exit {rc}, see {log.split('/')[-1]}"
    print(f"| {fam} | {label} | – | – | – | {why.replace('|', '/')} |")
PY
}

for fam in $FAMILIES; do
  dir="$WORK/$fam-full"
  [[ -f "$dir/config.json" ]] || timeout 600 "$ZMLX" synth --arch "$fam" --preset full --out "$dir" >"$RAW/synth-$fam.txt" 2>&1
  common=("$dir" --backend cuda --patch --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --runs "$RUNS" --json)
  timeout 600 "$ZMLX" bench "${common[@]}" >"$RAW/$fam-1gpu.json" 2>"$RAW/$fam-1gpu.log"
  row "$fam" "1 GPU" "$RAW/$fam-1gpu.json" "$RAW/$fam-1gpu.log" $?
  for mode in pipeline tensor; do
    timeout 600 "${MPIRUN[@]}" "$ZMLX" bench "${common[@]}" --parallel $mode >"$RAW/$fam-$mode.json" 2>"$RAW/$fam-$mode.log"
    row "$fam" "2 GPUs $mode" "$RAW/$fam-$mode.json" "$RAW/$fam-$mode.log" $?
  done
done
echo "<!-- $FAMILIES done $(date -u +%FT%TZ) -->" >> "$R"
tar czf "$OUT/raw.tar.gz" -C "$OUT" raw && rm -rf "$RAW"
cat "$R"
