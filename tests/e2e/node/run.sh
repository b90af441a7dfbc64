#!/usr/bin/env bash
# End-to-end checks of `zmlx serve` with the official OpenAI client (npm
# `openai`): synthesizes a tiny model, starts the node on a free port, runs
# node_test.mjs against it, checks that a busy port is one clear line, then
# drives the dashboard in headless Chromium (dashboard_test.mjs; screenshots in
# $ZMLX_ARTIFACTS, default tests/e2e/node/artifacts/; ZMLX_SKIP_BROWSER=1 skips it).
# Usage: tests/e2e/node/run.sh [ZMLX_BINARY]   (exit status non-zero on any failure)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ZMLX="$(realpath "${1:-$HERE/../../../build/zmlx}")"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; [[ -f "$WORK/serve.log" ]] && tail -20 "$WORK/serve.log" >&2; exit 1; }

command -v node >/dev/null || fail "node is not installed"
if [[ ! -d "$HERE/node_modules/openai" || ! -d "$HERE/node_modules/playwright-core" ]]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci failed"
fi

"$ZMLX" synth --arch qwen3_moe --preset tiny --out "$WORK/models/tiny" --seed 1 >/dev/null 2>&1 || fail "synth"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

"$ZMLX" serve "$WORK/models/tiny" --api-port "$PORT" --models-dir "$WORK/models" > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the node exited at start"
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || fail "the node did not come up on port $PORT"
grep -q "http://127.0.0.1:$PORT" "$WORK/serve.log" || fail "the node did not print its URL"
echo "ok   node up on port $PORT"

# A busy port: one clear line naming the port and the flag, non-zero exit.
set +e
"$ZMLX" serve --api-port "$PORT" > "$WORK/busy.out" 2> "$WORK/busy.err"
rc=$?
set -e
[[ $rc -ne 0 ]] || fail "a second node on a busy port exited 0"
[[ $(wc -l < "$WORK/busy.err") -eq 1 ]] || fail "busy port: expected one line, got: $(cat "$WORK/busy.err")"
grep -q "$PORT" "$WORK/busy.err" && grep -q -- "--api-port" "$WORK/busy.err" || fail "busy port line: $(cat "$WORK/busy.err")"
echo "ok   busy port: $(cat "$WORK/busy.err")"

ZMLX_BASE_URL="http://127.0.0.1:$PORT" ZMLX_MODEL=tiny ZMLX_MODEL_PATH="$WORK/models/tiny" \
  node "$HERE/node_test.mjs" || fail "node_test.mjs"

ZMLX_MODEL=tiny node "$HERE/dashboard_test.mjs" "http://127.0.0.1:$PORT" || fail "dashboard_test.mjs"

kill -0 "$SERVER_PID" 2>/dev/null || fail "the node died during the tests"
echo "ok   node still alive after all tests"
echo "node e2e: all passed"
