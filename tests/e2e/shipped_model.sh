#!/usr/bin/env bash
# The shipped model (models-shipped/zmlx-tiny-moe) against the golden continuations recorded at training time:
# transformers' greedy tokens on the same 4-bit weights (tests/e2e/shipped_model_golden.json, written by
# tools/train_tiny/train.py). Every prompt's zmlx greedy token ids must equal the golden ones exactly; this also
# guards the whole CPU path end to end (loader, 4-bit kernels, attention, MoE routing, sampler, eos handling).
# Runs unpatched and patched (EXO_ZMLX=1); both must match. Then, informational checks: the tokenizer reproduces the golden prompt ids from the prompt text (plain prompts
# with --prompt, chat prompts with --chat), and the decoded texts are printed for a human to read.
#   bash tests/e2e/shipped_model.sh build/zmlx [MODEL_DIR] [GOLDEN_JSON]
# ZMLX_CPU_ISA / --threads are the binary's own; set ZMLX_CPU_ISA=portable|avx2|avx512 to test one kernel variant.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
ZMLX="$(realpath "${1:-$ROOT/build/zmlx}")"
MODEL="${2:-$ROOT/models-shipped/zmlx-tiny-moe}"
GOLDEN="${3:-$ROOT/tests/e2e/shipped_model_golden.json}"
PY=/usr/bin/python3
[[ -x "$ZMLX" ]] || { echo "FAIL: no zmlx binary at $ZMLX" >&2; exit 1; }
[[ -f "$MODEL/model.safetensors" ]] || { echo "FAIL: no shipped model at $MODEL" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s.%N)

N=$($PY -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["prompts"]))' "$GOLDEN")
MAXTOK=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_tokens"])' "$GOLDEN")
for ((i = 0; i < N; i++)); do
  IDS=$($PY -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]["prompt_ids"])))' "$GOLDEN" "$i")
  for PATCH in 0 1; do  # unpatched, and with the fused-kernel patches (EXO_ZMLX=1, as the README's node runs)
    if ! EXO_ZMLX=$PATCH "$ZMLX" generate "$MODEL" --ids "$IDS" --max-tokens "$MAXTOK" --json 2>"$WORK/err$i" \
        | tail -1 > "$WORK/gen${PATCH}_$i.json"; then
      echo "FAIL: zmlx generate (EXO_ZMLX=$PATCH) failed on golden prompt $i:" >&2
      cat "$WORK/err$i" >&2
      exit 1
    fi
  done
  # the same prompt from its text, through the tokenizer (and the chat template for chat prompts)
  KIND=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]["kind"])' "$GOLDEN" "$i")
  TEXT=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]["text"])' "$GOLDEN" "$i")
  CHAT=(); [[ $KIND == chat ]] && CHAT=(--chat)
  "$ZMLX" generate "$MODEL" "${CHAT[@]}" --prompt "$TEXT" --max-tokens "$MAXTOK" --json 2>>"$WORK/err$i" \
    | tail -1 > "$WORK/txt$i.json" || echo '{}' > "$WORK/txt$i.json"
done
T1=$(date +%s.%N)

$PY - "$GOLDEN" "$WORK" "$N" "$T0" "$T1" <<'PY'
import json, sys
golden, work, n, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
g = json.load(open(golden))
ok_tokens = ok_prompts = total = 0
tok_ok = patched_ok = 0
for i, p in enumerate(g["prompts"]):
    z = json.load(open(f"{work}/gen0_{i}.json"))
    zp = json.load(open(f"{work}/gen1_{i}.json"))
    t = json.load(open(f"{work}/txt{i}.json"))
    want, got = p["token_ids"], z["token_ids"]
    same = sum(a == b for a, b in zip(want, got))
    patched_same = zp["token_ids"] == got
    patched_ok += patched_same
    equal = want == got and patched_same
    ok_prompts += equal
    ok_tokens += same if len(want) == len(got) else min(same, len(want))
    total += len(want)
    tok_same = t.get("prompt_ids") == p["prompt_ids"] and t.get("token_ids") == want
    tok_ok += tok_same
    first_diff = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    print(f"{'ok  ' if equal else 'FAIL'} [{p['kind']}] {p['text']!r}: {len(got)} tokens ({z.get('finish_reason')}), "
          f"golden {len(want)} ({p.get('finish_reason')})" + ("" if equal else f", first difference at token {first_diff}"))
    print(f"       zmlx:   {z.get('text', '')!r}")
    if not patched_same:
        print(f"       patched (EXO_ZMLX=1) differs from unpatched: {zp['token_ids']}")
    if not equal:
        print(f"       golden: {p.get('text_out', '')!r}")
        print(f"       ids zmlx   {got}\n       ids golden {want}")
    if not tok_same:
        print(f"       note: from the text ({'--chat --prompt' if p['kind'] == 'chat' else '--prompt'}) zmlx gives "
              f"prompt ids {t.get('prompt_ids')} (golden {p['prompt_ids']})"
              + ("" if t.get("token_ids") == want else ", and a different continuation"))
print(f"\nshipped model golden check: {ok_prompts}/{n} prompts identical, {ok_tokens}/{total} golden tokens matched, "
      f"patched == unpatched {patched_ok}/{n}; "
      f"from the prompt text (tokenizer + chat template) {tok_ok}/{n} give the same prompt ids and tokens; {t1 - t0:.1f}s")
sys.exit(0 if ok_prompts == n else 1)
PY
