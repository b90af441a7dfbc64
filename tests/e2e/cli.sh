#!/usr/bin/env bash
# End-to-end checks of the zmlx command line on a tiny synthetic model:
# every command runs, output is deterministic, and bad input gives one clear
# error line and a non-zero exit (never a crash).
set -euo pipefail
ZMLX="$(realpath "${1:-build/zmlx}")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok   $*"; }
PY=/usr/bin/python3

"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/m" --seed 1 2>/dev/null
"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/m2" --seed 1 2>/dev/null
(cd "$WORK/m" && sha256sum * ) > "$WORK/a.sum"
(cd "$WORK/m2" && sha256sum * ) > "$WORK/b.sum"
diff -q "$WORK/a.sum" "$WORK/b.sum" >/dev/null || fail "synth is not deterministic"
pass "synth: same seed, byte-identical files"

"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/sh" --set num_hidden_layers=2 --set hidden_size=256 2>/dev/null
$PY - "$WORK/sh/config.json" <<'PY' || fail "--set not applied"
import json,sys; c=json.load(open(sys.argv[1])); assert c["num_hidden_layers"]==2 and c["hidden_size"]==256, c
assert c["quantization"]=={"group_size":64,"bits":4}, c["quantization"]
PY
pass "synth --set overrides config fields"

"$ZMLX" inspect "$WORK/m" --json > "$WORK/inspect.json"
$PY - "$WORK/inspect.json" <<'PY' || fail "inspect --json"
import json,sys; j=json.load(open(sys.argv[1]))
assert j["family"]=="qwen3_moe" and len(j["layers"])==4 and j["active_params"] < j["total_params"], j
assert j["bytes_per_token"] > 0
PY
pass "inspect --json"

"$ZMLX" generate "$WORK/m" --prompt "hello world" --max-tokens 16 --json 2>/dev/null | tail -1 > "$WORK/g1.json"
"$ZMLX" generate "$WORK/m" --prompt "hello world" --max-tokens 16 --json 2>/dev/null | tail -1 > "$WORK/g2.json"
$PY - "$WORK/g1.json" "$WORK/g2.json" <<'PY' || fail "generate --json"
import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2]))
assert a["token_ids"]==b["token_ids"] and len(a["token_ids"])>0, (a,b)
for k in ("text","prefill_tps","decode_tps","prompt_ids"): assert k in a, k
PY
pass "generate --json is deterministic (greedy)"

"$ZMLX" generate "$WORK/m" --prompt "hello" --temp 0.8 --top-p 0.9 --seed 5 -n 12 --json 2>/dev/null | tail -1 > "$WORK/s1.json"
"$ZMLX" generate "$WORK/m" --prompt "hello" --temp 0.8 --top-p 0.9 --seed 5 -n 12 --json 2>/dev/null | tail -1 > "$WORK/s2.json"
cmp -s <($PY -c "import json;print(json.load(open('$WORK/s1.json'))['token_ids'])") \
       <($PY -c "import json;print(json.load(open('$WORK/s2.json'))['token_ids'])") || fail "same seed gave different samples"
pass "generate: same seed, same sample"

"$ZMLX" generate "$WORK/m" --chat --prompt "hi" -n 8 >/dev/null 2>&1 || fail "generate --chat"
pass "generate --chat"

"$ZMLX" bench "$WORK/m" --prompt-tokens 16 --gen-tokens 8 --runs 2 --json 2>/dev/null > "$WORK/bench.json"
$PY -c "import json; j=json.load(open('$WORK/bench.json')); assert j['decode_tps']['median']>0 and j['peak_rss_bytes']>0" || fail bench
pass "bench --json"

"$ZMLX" logits "$WORK/m" --ids 1,2,3,4 --out "$WORK/l.npy" 2>/dev/null
"$ZMLX" logits "$WORK/m" --ids 1,2,3,4 --chunk 1 --out "$WORK/l1.npy" 2>/dev/null
cmp -s "$WORK/l.npy" "$WORK/l1.npy" || fail "teacher-forced logits differ between one pass and token-by-token"
pass "logits: prefill and step-by-step decode bit-identical"

"$ZMLX" validate "$WORK/m" --max-tokens 24 --runs 2 > "$WORK/val.txt" 2>&1 || fail "validate failed: $(cat "$WORK/val.txt")"
grep -q "FIDELITY: 24/24 tokens identical  \[PASS\]" "$WORK/val.txt" || fail "validate report: $(cat "$WORK/val.txt")"
grep -q "(bit-identical)" "$WORK/val.txt" || fail "validate logits not bit-identical"
grep -q "Patched 4 modules in .*{'moe_mlp': 4}" "$WORK/val.txt" || fail "patch log line shape"
# One untimed fidelity pass per config, then the timed runs (which copy no logits).
[[ $(grep -c "fidelity pass: 24 tokens" "$WORK/val.txt") == 2 && $(grep -c " run [12]/2 \.\.\." "$WORK/val.txt") == 4 ]] ||
  fail "validate runs: $(cat "$WORK/val.txt")"
pass "validate: 24/24 tokens, logits bit-identical, seed log lines, fidelity pass untimed"
"$ZMLX" validate "$WORK/m" --max-tokens 8 --runs 1 --json 2>/dev/null > "$WORK/val.json"
$PY -c "import json; j=json.load(open('$WORK/val.json')); assert j['fidelity_pass'] and j['max_abs_logit_diff']==0 and j['patched_modules']==4, j" || fail "validate --json"
pass "validate --json"
EXO_ZMLX=1 "$ZMLX" generate "$WORK/m" --prompt hi -n 4 2>"$WORK/patch.log" >/dev/null
grep -q "Patched 4 modules" "$WORK/patch.log" || fail "EXO_ZMLX=1 did not patch"
EXO_ZMLX=1 "$ZMLX" generate "$WORK/m" --prompt hi -n 4 --no-patch 2>"$WORK/patch.log" >/dev/null
! grep -q "Patched" "$WORK/patch.log" || fail "--no-patch still patched"
pass "EXO_ZMLX=1 patches, --no-patch overrides"

# ---- lfm2_moe (spec §3): synth, inspect, validate
"$ZMLX" synth --arch lfm2_moe --preset tiny --out "$WORK/lfm" --seed 2 2>/dev/null
"$ZMLX" inspect "$WORK/lfm" --json > "$WORK/lfm_inspect.json"
$PY - "$WORK/lfm_inspect.json" "$WORK/lfm/config.json" <<'PY' || fail "lfm2_moe synth/inspect"
import json,sys; j=json.load(open(sys.argv[1])); c=json.load(open(sys.argv[2]))
assert j["family"]=="lfm2_moe" and len(j["layers"])==6, j
assert c["quantization"]["model.layers.2.feed_forward.gate"]=={"group_size":64,"bits":8}, c["quantization"]
assert "model.layers.1.feed_forward.gate" not in c["quantization"] and c["tie_word_embeddings"] is True
PY
"$ZMLX" validate "$WORK/lfm" --max-tokens 16 --runs 1 --json 2>/dev/null > "$WORK/lfm_val.json"
$PY -c "import json; j=json.load(open('$WORK/lfm_val.json')); assert j['fidelity_pass'] and j['max_abs_logit_diff']==0 and j['patched_modules']==6, j" || fail "lfm2_moe validate --json"
pass "lfm2_moe: synth (8-bit router override), inspect, validate bit-identical"

# ---- glm4_moe_lite (spec §2): synth determinism, inspect, validate, the seed's patch line
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --out "$WORK/glm" --seed 3 2>/dev/null
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --out "$WORK/glm2" --seed 3 2>/dev/null
cmp -s "$WORK/glm/model.safetensors" "$WORK/glm2/model.safetensors" || fail "glm4_moe_lite synth is not deterministic"
"$ZMLX" inspect "$WORK/glm" --json > "$WORK/glm_inspect.json"
$PY - "$WORK/glm_inspect.json" "$WORK/glm/config.json" <<'PY' || fail "glm4_moe_lite synth/inspect"
import json,sys; j=json.load(open(sys.argv[1])); c=json.load(open(sys.argv[2]))
assert j["family"]=="glm4_moe_lite" and len(j["layers"])==4, j
assert c["first_k_dense_replace"]==1 and c["routed_scaling_factor"]==1.8 and len(c["eos_token_id"])==3, c
PY
"$ZMLX" validate "$WORK/glm" --max-tokens 16 --runs 1 --json 2>/dev/null > "$WORK/glm_val.json"
$PY -c "import json; j=json.load(open('$WORK/glm_val.json')); assert j['fidelity_pass'] and j['max_abs_logit_diff']==0 and j['patched_modules']==4, j" || fail "glm4_moe_lite validate --json"
"$ZMLX" synth --arch glm4_moe_lite --preset tiny --set num_hidden_layers=47 --out "$WORK/glm47" 2>/dev/null
EXO_ZMLX=1 "$ZMLX" generate "$WORK/glm47" --prompt hi -n 2 2>"$WORK/glm_patch.log" >/dev/null
grep -q "Patched 47 modules in .*{'swiglu_mlp': 1, 'moe_mlp': 46}" "$WORK/glm_patch.log" || fail "glm4_moe_lite patch line: $(cat "$WORK/glm_patch.log")"
pass "glm4_moe_lite: synth deterministic, inspect, validate bit-identical, Patched 47 modules {'swiglu_mlp': 1, 'moe_mlp': 46}"

# ---- bad input: clear message, exit 1, no crash
expect_error() {  # expect_error "needle" cmd...
  local needle="$1"; shift
  set +e; "$@" >"$WORK/out" 2>"$WORK/err"; local rc=$?; set -e
  [[ $rc -eq 1 ]] || fail "expected exit 1 from '$*', got $rc: $(cat "$WORK/err")"
  grep -q -- "$needle" "$WORK/err" || fail "error of '$*' lacks '$needle': $(cat "$WORK/err")"
  pass "error: $(head -c 150 "$WORK/err" | tr '\n' ' ')"
}
HF_HOME="$WORK/hf" expect_error "Looked at" "$ZMLX" generate mlx-community/NoSuchModel-4bit --prompt hi
cp -r "$WORK/m" "$WORK/corrupt"
$PY - "$WORK/corrupt/model.safetensors" <<'PY'
import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); open(p,'wb').write(b[:len(b)//2])
PY
expect_error "model.safetensors" "$ZMLX" generate "$WORK/corrupt" --prompt hi
cp -r "$WORK/m" "$WORK/badcfg"; echo '{"model_type": "qwen3_moe",' > "$WORK/badcfg/config.json"
expect_error "config.json" "$ZMLX" inspect "$WORK/badcfg"
expect_error "vocabulary" "$ZMLX" generate "$WORK/m" --ids 1,2,99999999
expect_error "warp_drive" "$ZMLX" generate "$WORK/m" --prompt hi --patterns warp_drive
echo "cli e2e: all passed"
