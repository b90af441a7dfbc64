#!/usr/bin/env bash
# GPU ranks over NCCL on tiny synthetic models: 2 ranks, one GPU each, against
# one GPU (run on a machine with at least 2 GPUs; skips otherwise):
#   pipeline: token ids and logits bit-identical to one GPU (the same kernels run);
#   tensor (fused patches on): greedy tokens identical, logits within relative L2 1e-2;
# for qwen3_moe, lfm2_moe and glm4_moe_lite (a family that refuses --parallel
# is reported as skipped, not failed); then the node's /state names each
# rank's GPU, and a hung rank ends the job within the deadline, naming it.
#   BIN=build-device (the directory holding zmlx; lib/ beside it is added to LD_LIBRARY_PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build-device}
ZMLX="$(realpath "$BIN/zmlx")"
export LD_LIBRARY_PATH="$PWD/$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK="$(mktemp -d)"
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok   $*"; }
skip() { echo "skip $*"; }
PY=python3

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if (( gpus < 2 )); then echo "skip: $gpus GPU(s) visible, this test needs 2"; exit 0; fi
if ! command -v mpirun >/dev/null; then echo "skip: no mpirun"; exit 0; fi
# libnccl: the nvidia-nccl Python wheel's when there is one (PyTorch's, usually
# newer than the system package), else the system's. The tensor-parallel
# decode all-reduce runs on NCCL's device API only where the library loaded
# is the version zmlx was compiled against (it says so otherwise).
nccl_lib=$($PY -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
[[ -n "$nccl_lib" && -f "$nccl_lib/libnccl.so.2" ]] && export LD_LIBRARY_PATH="$nccl_lib:$LD_LIBRARY_PATH"
# NVLink multicast stays off on shared machines (it can take the host's GPUs down).
export ZMLX_NCCL_DEVICE_ALLREDUCE=${ZMLX_NCCL_DEVICE_ALLREDUCE:-1}  # 0: ncclAllReduce (A/B runs)
export ZMLX_TP_FUSED_NORM=${ZMLX_TP_FUSED_NORM:-1}  # 0: all-reduce and add+RMSNorm apart (A/B runs)
export NCCL_NVLS_ENABLE=0
export OMP_NUM_THREADS=1
if [[ $(id -u) == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np 2 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x ZMLX_NCCL_DEVICE_ALLREDUCE -x ZMLX_TP_FUSED_NORM -x OMP_NUM_THREADS)

tokens() { $PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["token_ids"])' "$1"; }
# rel_l2 A B: relative L2 distance of two raw float32 files
rel_l2() {
  $PY - "$1" "$2" <<'PY'
import array, math, sys
a = array.array("f"); b = array.array("f")
a.frombytes(open(sys.argv[1], "rb").read()); b.frombytes(open(sys.argv[2], "rb").read())
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
print(math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / math.sqrt(sum(x * x for x in a)))
PY
}

# Tiny models; moe_intermediate_size 128 = 2 quantization groups, so experts split in two. Qwen3 gets
# 64-wide heads, so a rank's one-token attention (2 query heads on 1 kv head) takes the grouped
# tensor-core kernel; LFM2's takes the per-head one. GLM gets the full model's latent and rotary
# widths (512 + 64), so its one-token absorbed attention takes the tensor-core kernel (a rank's 2
# heads in one block). (LFM2 at hidden_size 256, for 64-wide heads, is itself 1.4-1.7e-2 from the
# CPU on one GPU, with either attention kernel: 2026-11-27.)
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/qwen3_moe" --seed 3 --set moe_intermediate_size=128 \
  --set head_dim=64 2>/dev/null
"$ZMLX" synth --arch lfm2_moe --preset tiny --out "$WORK/lfm2_moe" --seed 2 --set moe_intermediate_size=128 2>/dev/null
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --out "$WORK/glm4_moe_lite" --seed 4 --set moe_intermediate_size=128 \
  --set kv_lora_rank=512 --set qk_rope_head_dim=64 2>/dev/null

if "${MPIRUN[@]}" "$ZMLX" generate "$WORK/qwen3_moe" --ids 1,2,3 --max-tokens 1 --backend cuda --parallel pipeline \
    > "$WORK/probe.out" 2>&1; then :; else
  grep -q "built without NCCL\|has no NCCL\|built without MPI" "$WORK/probe.out" && { grep -m1 "error" "$WORK/probe.out"; echo "skip: no GPU ranks in this build"; exit 0; }
  cat "$WORK/probe.out"; fail "2 GPU ranks could not start"
fi
grep -o "rank [01]/2 [^(]*on cuda:[0-9]" "$WORK/probe.out" | sort -u | sed 's/^/     /'
grep -q "rank 1/2 .*on cuda:1" "$WORK/probe.out" || { cat "$WORK/probe.out"; fail "rank 1 is not on GPU 1"; }

PROMPT=5,17,300,42,7,99,1000,3
CUDA=(--backend cuda)
for fam in qwen3_moe lfm2_moe glm4_moe_lite; do
  M="$WORK/$fam"
  "$ZMLX" generate "$M" "${CUDA[@]}" --ids $PROMPT --max-tokens 24 --json --patch --dump-logits "$WORK/$fam.single.bin" \
    > "$WORK/$fam.single.json" 2> "$WORK/$fam.single.err" || { cat "$WORK/$fam.single.err"; fail "$fam: one GPU"; }
  "$ZMLX" logits "$M" "${CUDA[@]}" --ids $PROMPT,11,12,13 --out "$WORK/$fam.single.npy" 2>/dev/null || fail "$fam: one-GPU logits"

  # pipeline: the same kernels run, split across the GPUs
  if ! "${MPIRUN[@]}" "$ZMLX" generate "$M" "${CUDA[@]}" --ids $PROMPT --max-tokens 24 --json --patch \
      --parallel pipeline --dump-logits "$WORK/$fam.pipe.bin" > "$WORK/$fam.pipe.json" 2> "$WORK/$fam.pipe.err"; then
    if grep -q "does not support multi-process parallelism" "$WORK/$fam.pipe.err"; then
      skip "$fam: $(grep -m1 -o 'the .* family does not support[^"]*' "$WORK/$fam.pipe.err")"
      continue
    fi
    cat "$WORK/$fam.pipe.err"; fail "$fam pipeline"
  fi
  [[ "$(tokens "$WORK/$fam.single.json")" == "$(tokens "$WORK/$fam.pipe.json")" ]] || fail "$fam pipeline: tokens differ"
  cmp -s "$WORK/$fam.single.bin" "$WORK/$fam.pipe.bin" || fail "$fam pipeline: logits not bit-identical to one GPU"
  "${MPIRUN[@]}" "$ZMLX" logits "$M" "${CUDA[@]}" --ids $PROMPT,11,12,13 --out "$WORK/$fam.pipe.npy" \
    --parallel pipeline 2>/dev/null || fail "$fam pipeline logits"
  cmp -s "$WORK/$fam.single.npy" "$WORK/$fam.pipe.npy" || fail "$fam pipeline: teacher-forced logits not bit-identical"
  pass "$fam pipeline (2 GPUs): tokens and logits bit-identical to one GPU"

  # tensor: fused kernels on each rank's shard, one NCCL all-reduce per block
  "${MPIRUN[@]}" "$ZMLX" generate "$M" "${CUDA[@]}" --ids $PROMPT --max-tokens 24 --json --parallel tensor --patch \
    --dump-logits "$WORK/$fam.tp.bin" > "$WORK/$fam.tp.json" 2> "$WORK/$fam.tp.err" \
    || { cat "$WORK/$fam.tp.err"; fail "$fam tensor"; }
  grep -Eq "Patched [1-9][0-9]* modules.*tensor shard 2/2" "$WORK/$fam.tp.err" || fail "$fam tensor: fused patches not applied on rank 1"
  [[ "$(tokens "$WORK/$fam.single.json")" == "$(tokens "$WORK/$fam.tp.json")" ]] || fail "$fam tensor: greedy tokens differ"
  r=$(rel_l2 "$WORK/$fam.single.bin" "$WORK/$fam.tp.bin")
  $PY -c "import sys; sys.exit(0 if float('$r') <= 1e-2 else 1)" || fail "$fam tensor: logits rel L2 $r > 1e-2"
  pass "$fam tensor (2 GPUs, fused): greedy tokens identical, logits rel L2 $r"
done

# The decode all-reduce on NCCL's device API, alone and fused with the next
# add + RMSNorm (rows of a multiple of 256: hidden 256 here), gives the bits of
# ncclAllReduce + add_rms_norm.
M="$WORK/qwen3_moe_h256"
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$M" --seed 5 --set hidden_size=256 --set moe_intermediate_size=128 2>/dev/null
for v in "1 1 fused" "1 0 device" "0 0 nccl"; do
  set -- $v
  ZMLX_NCCL_DEVICE_ALLREDUCE=$1 ZMLX_TP_FUSED_NORM=$2 "${MPIRUN[@]}" "$ZMLX" generate "$M" "${CUDA[@]}" --ids $PROMPT \
    --max-tokens 24 --json --parallel tensor --patch --dump-logits "$WORK/ar.$3.bin" > "$WORK/ar.$3.json" 2> "$WORK/ar.$3.err" \
    || { cat "$WORK/ar.$3.err"; fail "tensor ($3 all-reduce)"; }
done
if off=$(grep -m1 -o "NCCL device all-reduce off: .*" "$WORK/ar.fused.err"); then
  skip "device all-reduce: $off"
elif ! grep -q "NCCL device all-reduce on" "$WORK/ar.fused.err"; then
  cat "$WORK/ar.fused.err"; fail "tensor: rank 0 said neither 'device all-reduce on' nor 'off'"
else
  cmp -s "$WORK/ar.fused.bin" "$WORK/ar.nccl.bin" || fail "tensor: fused device all-reduce + add + RMSNorm logits differ from ncclAllReduce + add_rms_norm"
  cmp -s "$WORK/ar.device.bin" "$WORK/ar.nccl.bin" || fail "tensor: device all-reduce logits differ from ncclAllReduce"
  pass "tensor: device all-reduce (alone and fused with add + RMSNorm) bit-identical to ncclAllReduce, 24 tokens"
fi

# The node over 2 GPU ranks: /state names each rank's GPU; completions match one GPU.
"${MPIRUN[@]}" "$ZMLX" serve "$WORK/qwen3_moe" "${CUDA[@]}" --parallel tensor --port 0 > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVE=$!
for _ in $(seq 600); do grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(grep -Eo '127\.0\.0\.1:[0-9]+' "$WORK/serve.out" | head -1 | cut -d: -f2)
[[ -n "$PORT" ]] || { kill $SERVE; cat "$WORK/serve.err"; fail "serve --parallel tensor on GPUs did not start"; }
"$ZMLX" generate "$WORK/qwen3_moe" "${CUDA[@]}" --prompt "hello world" --max-tokens 12 --json 2>/dev/null | tail -1 > "$WORK/serve.single.json"
$PY - "$PORT" "$WORK/serve.single.json" <<'PY' || { kill $SERVE; cat "$WORK/serve.err"; fail "serve --parallel tensor on GPUs"; }
import json, sys, urllib.request
base = "http://127.0.0.1:" + sys.argv[1]
st = json.load(urllib.request.urlopen(base + "/state"))["parallel"]
assert st["transport"] == "nccl", st
for r in st["ranks"]:
    assert r["device"].startswith("cuda:%d " % r["rank"]), st
print("     /state:", [(r["rank"], r["device"]) for r in st["ranks"]])
want = json.load(open(sys.argv[2]))["text"]
for _ in range(2):
    req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "qwen3_moe", "prompt": "hello world", "max_tokens": 12, "temperature": 0}).encode())
    got = json.load(urllib.request.urlopen(req))["choices"][0]["text"]
    assert got == want, (got, want)
PY
kill -INT $SERVE; wait $SERVE || true
pass "serve --parallel tensor on 2 GPUs: /state names each rank's GPU; completions match one GPU"

# A rank that hangs mid-generation: its peer's pending NCCL operation passes the
# deadline and the watchdog ends the job (tensor), or its peer's wait for the
# sampled token does and that rank aborts the job without tearing down NCCL
# (pipeline: the one-token send completes into NCCL's buffer), naming rank 1.
for mode in tensor pipeline; do
  start=$(date +%s)
  if ZMLX_DIST_FAULT=1:hang:3 timeout 120 "${MPIRUN[@]}" -x ZMLX_DIST_FAULT "$ZMLX" generate "$WORK/qwen3_moe" "${CUDA[@]}" \
      --ids $PROMPT --max-tokens 24 --parallel $mode --dist-timeout 3 > "$WORK/hang.$mode.out" 2>&1; then
    fail "$mode: a hung GPU rank went unnoticed"
  fi
  took=$(( $(date +%s) - start ))
  (( took < 60 )) || { cat "$WORK/hang.$mode.out"; fail "$mode: took ${took}s to fail"; }
  grep -v '^\[zmlx\]' "$WORK/hang.$mode.out" | grep -Eq "rank 1\b" || { cat "$WORK/hang.$mode.out"; fail "$mode hang: the message does not name rank 1"; }
  pass "$mode: rank 1 hung at step 3: job failed in ${took}s ($(grep -m1 -o 'zmlx: error: .*' "$WORK/hang.$mode.out" | cut -c1-140))"
done
echo "mpi gpu e2e: all passed"
