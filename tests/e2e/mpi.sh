#!/usr/bin/env bash
# Multi-process parallelism over MPI on tiny synthetic models (2 ranks, CPU):
#   pipeline: token ids and logits bit-identical to one process;
#   tensor:   greedy tokens identical, logits within relative L2 1e-2;
#   a killed or hung rank makes the job fail fast, naming the rank;
#   a config that does not divide is refused with a clear message;
# for qwen3_moe, dense qwen3, glm4_moe_lite (generation and teacher-forced) and
# lfm2_moe (teacher-forced).
# Skips (exit 0) when mpirun is missing or zmlx was built without MPI.
set -euo pipefail
ZMLX="$(realpath "${1:-build/zmlx}")"
WORK="$(mktemp -d)"
trap '[[ -n "${KEEP:-}" ]] || rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok   $*"; }
PY=/usr/bin/python3

if ! command -v mpirun >/dev/null; then echo "skip: no mpirun"; exit 0; fi
export OMP_NUM_THREADS=1
if [[ $(id -u) == 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
MPIRUN=(mpirun --oversubscribe -np 2)

# The synthetic models: MoE (moe_intermediate_size 128 = 2 groups of 64,
# so it splits in two), dense qwen3, GLM-4.7-Flash (MLA, dense layer 0, shared
# expert; experts 128 wide likewise), and the stock tiny MoE (64 = one group: tensor refuses).
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/moe" --seed 3 --set moe_intermediate_size=128 2>/dev/null
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/dense" --seed 4 --set model_type='"qwen3"' 2>/dev/null
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --out "$WORK/glm" --seed 4 --set moe_intermediate_size=128 2>/dev/null
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/odd" --seed 5 2>/dev/null

if "$ZMLX" generate "$WORK/moe" --ids 1,2,3 --max-tokens 1 --parallel pipeline 2>&1 | grep -q "built without MPI"; then
  echo "skip: zmlx built without MPI"; exit 0
fi

# relL2 FILE_A FILE_B -> prints the relative L2 distance of two raw float32 files
rel_l2() {
  $PY - "$1" "$2" <<'PY'
import array, math, sys
a = array.array("f"); b = array.array("f")
a.frombytes(open(sys.argv[1], "rb").read()); b.frombytes(open(sys.argv[2], "rb").read())
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
print(math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / math.sqrt(sum(x * x for x in a)))
PY
}
tokens() { $PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["token_ids"])' "$1"; }
# tf_rel_l2 A.npy B.npy -> relative L2 of two teacher-forced logit files; fails
# when the argmax of any position differs
tf_rel_l2() {
  $PY - "$1" "$2" <<'PY'
import array, math, sys
def load(p):
    b = open(p, "rb").read(); n = int.from_bytes(b[8:10], "little"); h = b[10:10 + n].decode()
    a = array.array("f"); a.frombytes(b[10 + n:]); V = int(h.split("shape': (")[1].split(",")[1].split(")")[0])
    return a, V
(a, V), (b, _) = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b) > 0
rows = len(a) // V
am = lambda x, r: max(range(V), key=lambda i: x[r * V + i])
assert all(am(a, r) == am(b, r) for r in range(rows)), "argmax differs"
print(math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))) / math.sqrt(sum(x * x for x in a)))
PY
}

PROMPT=5,17,300,42,7,99,1000,3
# glm: prompts run MLA's expanded form, decode steps its absorbed form.
for m in moe dense glm; do
  "$ZMLX" generate "$WORK/$m" --ids $PROMPT --max-tokens 24 --json --dump-logits "$WORK/$m.single.bin" \
    > "$WORK/$m.single.json" 2>/dev/null
  "$ZMLX" logits "$WORK/$m" --ids $PROMPT,11,12,13 --out "$WORK/$m.single.npy" 2>/dev/null

  # pipeline, split by bytes and by hand; patched (fused kernels on every rank) and not
  for extra in "" "--layers 0-0,1-3 --patch"; do
    # shellcheck disable=SC2086
    "${MPIRUN[@]}" "$ZMLX" generate "$WORK/$m" --ids $PROMPT --max-tokens 24 --json --parallel pipeline $extra \
      --dump-logits "$WORK/$m.pipe.bin" > "$WORK/$m.pipe.json" 2> "$WORK/$m.pipe.err" || { cat "$WORK/$m.pipe.err"; fail "$m pipeline $extra"; }
    [[ "$(tokens "$WORK/$m.single.json")" == "$(tokens "$WORK/$m.pipe.json")" ]] || fail "$m pipeline $extra: tokens differ"
    cmp -s "$WORK/$m.single.bin" "$WORK/$m.pipe.bin" || fail "$m pipeline $extra: logits not bit-identical"
  done
  grep -q "rank 1/2 layers 1-3" "$WORK/$m.pipe.err" || fail "$m pipeline: the patch log does not name rank 1's layers"
  "${MPIRUN[@]}" "$ZMLX" logits "$WORK/$m" --ids $PROMPT,11,12,13 --out "$WORK/$m.pipe.npy" --parallel pipeline 2>/dev/null
  cmp -s "$WORK/$m.single.npy" "$WORK/$m.pipe.npy" || fail "$m pipeline: teacher-forced logits not bit-identical"
  pass "$m pipeline (2 ranks): tokens and logits bit-identical to one process"

  "${MPIRUN[@]}" "$ZMLX" generate "$WORK/$m" --ids $PROMPT --max-tokens 24 --json --parallel tensor --patch \
    --patterns swiglu_mlp,moe_mlp --dump-logits "$WORK/$m.tp.bin" > "$WORK/$m.tp.json" 2> "$WORK/$m.tp.err" \
    || { cat "$WORK/$m.tp.err"; fail "$m tensor"; }
  grep -Eq "Patched [1-9][0-9]* modules.*tensor shard 2/2" "$WORK/$m.tp.err" || fail "$m tensor: fused patches not applied on rank 1"
  [[ "$(tokens "$WORK/$m.single.json")" == "$(tokens "$WORK/$m.tp.json")" ]] || fail "$m tensor: greedy tokens differ"
  r=$(rel_l2 "$WORK/$m.single.bin" "$WORK/$m.tp.bin")
  $PY -c "import sys; sys.exit(0 if float('$r') <= 1e-2 else 1)" || fail "$m tensor: logits rel L2 $r > 1e-2"
  pass "$m tensor (2 ranks, fused): greedy tokens identical, logits rel L2 $r"
done

# LFM2-MoE (short-conv layers replicated under tensor parallel): teacher-forced logits.
"$ZMLX" synth --arch lfm2_moe --preset tiny --out "$WORK/lfm2" --seed 2 --set moe_intermediate_size=128 2>/dev/null
IDS=$PROMPT,11,12,13,14,15,16
"$ZMLX" logits "$WORK/lfm2" --ids $IDS --out "$WORK/lfm2.single.npy" 2>/dev/null
"${MPIRUN[@]}" "$ZMLX" logits "$WORK/lfm2" --ids $IDS --out "$WORK/lfm2.pipe.npy" --parallel pipeline --patch 2>/dev/null
cmp -s "$WORK/lfm2.single.npy" "$WORK/lfm2.pipe.npy" || fail "lfm2 pipeline: logits not bit-identical"
"${MPIRUN[@]}" "$ZMLX" logits "$WORK/lfm2" --ids $IDS --out "$WORK/lfm2.tp.npy" --parallel tensor --patch 2>/dev/null
r=$(tf_rel_l2 "$WORK/lfm2.single.npy" "$WORK/lfm2.tp.npy") || fail "lfm2 tensor: argmax of some position differs"
$PY -c "import sys; sys.exit(0 if float('$r') <= 1e-2 else 1)" || fail "lfm2 tensor: logits rel L2 $r > 1e-2"
pass "lfm2_moe: pipeline logits bit-identical; tensor argmax identical at every position, rel L2 $r"

# GLM teacher-forced under tensor parallel (the expanded MLA form over each rank's heads).
"${MPIRUN[@]}" "$ZMLX" logits "$WORK/glm" --ids $PROMPT,11,12,13 --out "$WORK/glm.tp.npy" --parallel tensor --patch 2>/dev/null
r=$(tf_rel_l2 "$WORK/glm.single.npy" "$WORK/glm.tp.npy") || fail "glm tensor: argmax of some position differs"
$PY -c "import sys; sys.exit(0 if float('$r') <= 1e-2 else 1)" || fail "glm tensor: teacher-forced logits rel L2 $r > 1e-2"
pass "glm4_moe_lite tensor: teacher-forced argmax identical at every position, rel L2 $r"

# The node over 2 ranks: API on rank 0, rank 1 follows; /state lists both ranks.
"${MPIRUN[@]}" "$ZMLX" serve "$WORK/moe" --parallel tensor --port 0 > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVE=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(grep -Eo '127\.0\.0\.1:[0-9]+' "$WORK/serve.out" | head -1 | cut -d: -f2)
[[ -n "$PORT" ]] || { kill $SERVE; cat "$WORK/serve.err"; fail "serve --parallel did not start"; }
"$ZMLX" generate "$WORK/moe" --prompt "hello world" --max-tokens 12 --json 2>/dev/null | tail -1 > "$WORK/serve.single.json"
$PY - "$PORT" "$WORK/serve.single.json" <<'PY' || { kill $SERVE; cat "$WORK/serve.err"; fail "serve --parallel"; }
import json, sys, urllib.request
base = "http://127.0.0.1:" + sys.argv[1]
st = json.load(urllib.request.urlopen(base + "/state"))["parallel"]
assert st["mode"] == "tensor" and [r["rank"] for r in st["ranks"]] == [0, 1] and st["ranks"][1]["shard"] == "2/2", st
want = json.load(open(sys.argv[2]))["text"]
for _ in range(2):  # two requests: the follower stays in step
    req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "moe", "prompt": "hello world", "max_tokens": 12, "temperature": 0}).encode())
    got = json.load(urllib.request.urlopen(req))["choices"][0]["text"]
    assert got == want, (got, want)
PY
kill -INT $SERVE; wait $SERVE || true
pass "serve --parallel tensor: /state lists both ranks; completions match one process"

# A dimension that does not divide is refused, naming it.
if "${MPIRUN[@]}" "$ZMLX" generate "$WORK/odd" --ids 1,2,3 --max-tokens 2 --parallel tensor > "$WORK/odd.out" 2>&1; then
  fail "tensor parallel on a non-dividing expert size was accepted"
fi
grep -q "not a multiple of the quantization group size" "$WORK/odd.out" || { cat "$WORK/odd.out"; fail "no clear refusal"; }
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/kv3" --seed 5 --set num_key_value_heads=1 2>/dev/null
if "${MPIRUN[@]}" "$ZMLX" generate "$WORK/kv3" --ids 1,2,3 --max-tokens 2 --parallel tensor > "$WORK/kv3.out" 2>&1; then
  fail "tensor parallel with 1 kv head on 2 ranks was accepted"
fi
grep -q "key/value heads do not both divide" "$WORK/kv3.out" || { cat "$WORK/kv3.out"; fail "no clear kv-head refusal"; }
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --out "$WORK/glm3" --seed 5 --set num_attention_heads=3 --set num_key_value_heads=3 \
  --set moe_intermediate_size=128 2>/dev/null
if "${MPIRUN[@]}" "$ZMLX" generate "$WORK/glm3" --ids 1,2,3 --max-tokens 2 --parallel tensor > "$WORK/glm3.out" 2>&1; then
  fail "tensor parallel with 3 MLA heads on 2 ranks was accepted"
fi
grep -q "3 attention heads do not divide across 2 ranks" "$WORK/glm3.out" || { cat "$WORK/glm3.out"; fail "no clear MLA-head refusal"; }
pass "non-dividing configs refused (expert group alignment, kv heads, MLA heads)"

# A rank that dies, or hangs, mid-generation: the job ends non-zero within the timeout, naming rank 1.
for fault in kill hang; do
  start=$(date +%s)
  if ZMLX_DIST_FAULT=1:$fault:3 timeout 60 "${MPIRUN[@]}" "$ZMLX" generate "$WORK/moe" --ids $PROMPT --max-tokens 24 \
      --parallel pipeline --dist-timeout 3 > "$WORK/$fault.out" 2>&1; then
    fail "a ${fault}ed rank went unnoticed"
  fi
  took=$(( $(date +%s) - start ))
  (( took < 30 )) || fail "$fault: took ${took}s to fail"
  # (the ranks' own "[zmlx] rank 1/2 ..." log lines do not count)
  grep -v '^\[zmlx\]' "$WORK/$fault.out" | grep -Eq "rank 1\b" || { cat "$WORK/$fault.out"; fail "$fault: the message does not name rank 1"; }
  pass "rank 1 ${fault}ed at step 3: job failed in ${took}s naming rank 1 ($(grep -v '^\[zmlx\]' "$WORK/$fault.out" | grep -Eo 'rank 1[^:]*' | head -1))"
done
grep -q "no answer within 3 s" "$WORK/hang.out" || { cat "$WORK/hang.out"; fail "hang: no deadline message"; }
echo "mpi e2e: all passed"
