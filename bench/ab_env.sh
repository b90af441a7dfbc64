#!/usr/bin/env bash
# A/B decode runs on the GPU machine: a base binary against env-switch
# variants of the new one, in one call, alternating; then, per variant, the
# logits of 48 greedy steps compared with `cmp` (patched against --no-patch,
# and against the base binary). Lines go to $OUT/r.txt.
#   run(carry=["build-device"]): build-device/zmlx (new), build-device/zmlx-base (old); any
#   build-device/NAME.xz is unpacked to NAME first (xz -1 keeps three binaries under the carry limit)
#   VARIANTS="name=ENV=VALUE ..."   ARCHS="qwen3_moe lfm2_moe glm4_moe_lite"   TESTS=1 (the GPU unit tests first)
# Example: VARIANTS="new=ZMLX_X=1 off=ZMLX_CUDA_TWO_STEP_COMBINE=0" bash bench/ab_env.sh
set -u
cd "$(dirname "$0")/.."
B=${BIN:-build-device}
export LD_LIBRARY_PATH="$PWD/$B/lib"
for f in "$B"/*.xz; do [[ -e $f ]] && xz -d -k -f "$f"; done
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
OUT=${OUT:-/tmp/zmlx-ab}
mkdir -p "$OUT"
R=$OUT/r.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$R"
if [[ ${TESTS:-1} == 1 ]]; then
  timeout 200 "$B/zmlx_tests" --gtest_filter='Cuda*' >"$OUT/tests.txt" 2>&1
  echo "tests exit $? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/tests.txt" | tr '\n' ' ')" | tee -a "$R"
  grep -E -A4 'Failure|FAILED  \]' "$OUT/tests.txt" | head -30 | tee -a "$R"
fi
ids=$(seq -s, 11 50)
decode() {  # bin env... -> "min/max" decode tok/s of two runs
  local bin=$1; shift
  env "$@" "$bin" bench "$d" --backend cuda --patch --prompt-tokens 512 --gen-tokens 128 --runs 2 --json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print('%.1f/%.1f' % (j['decode_tps']['min'], j['decode_tps']['max']))"
}
for arch in ${ARCHS:-qwen3_moe lfm2_moe glm4_moe_lite}; do
  d=$W/$arch
  timeout 300 "$B/zmlx" synth --arch "$arch" --preset full --out "$d" >/dev/null 2>&1
  for run in 1 2; do
    echo "$arch run$run base $(decode "$B/zmlx-base")" | tee -a "$R"
    for v in ${VARIANTS:-}; do
      echo "$arch run$run ${v%%=*} $(decode "$B/zmlx" "${v#*=}")" | tee -a "$R"
    done
  done
  "$B/zmlx-base" generate "$d" --backend cuda --ids "$ids" --max-tokens 48 --dump-logits "$W/l-base" >/dev/null 2>&1
  for v in ${VARIANTS:-}; do
    env "${v#*=}" "$B/zmlx" generate "$d" --backend cuda --ids "$ids" --max-tokens 48 --dump-logits "$W/l-p" >/dev/null 2>&1
    env "${v#*=}" "$B/zmlx" generate "$d" --backend cuda --no-patch --ids "$ids" --max-tokens 48 --dump-logits "$W/l-np" >/dev/null 2>&1
    echo "$arch ${v%%=*} cmp patch/nopatch: $(cmp "$W/l-p" "$W/l-np" && echo same)  vs base: $(cmp -s "$W/l-p" "$W/l-base" && echo same || echo differs)" | tee -a "$R"
  done
  rm -rf "$d"
done
