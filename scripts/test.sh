#!/usr/bin/env bash
# Sets everything up and runs every test that can run on this machine:
# unit tests (GoogleTest), the tokenizer/template conformance suite against
# Hugging Face's own implementations, and the CLI end-to-end checks.
# GPU tests skip cleanly where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh

echo "== unit tests"
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 900)

# The model-level suites again under every other kernel variant this CPU
# runs (fused vs unfused must stay bit-identical under each).
for isa in portable avx2; do
  if [[ $isa == avx2 ]] && ! grep -qw avx2 /proc/cpuinfo; then continue; fi
  echo "== unit tests with ZMLX_CPU_ISA=$isa"
  ZMLX_CPU_ISA=$isa build/zmlx_tests --gtest_brief=1 --gtest_filter='FusedMoe*:FusedSwiglu*:Patch*:Model*:CpuOps*:DecodeAndPrefill*'
done

echo "== tools"
python3 tests/tools/test_kernel_trace_summary.py

echo "== CLI end to end"
bash tests/e2e/cli.sh build/zmlx

echo "== multi-process parallelism over MPI (2 ranks: pipeline, tensor, failures)"
bash tests/e2e/mpi.sh build/zmlx

echo "== shipped model: greedy tokens vs transformers golden"
bash tests/e2e/shipped_model.sh build/zmlx
build/zmlx validate models-shipped/zmlx-tiny-moe --prompt "The meaning of life is" --max-tokens 32 --runs 1 \
  2>/dev/null | grep -E "FIDELITY|dlogit"

echo "== node: OpenAI client against zmlx serve"
bash tests/e2e/node/run.sh build/zmlx

if [[ -x tests/text/run.sh ]]; then
  echo "== tokenizer and chat-template conformance"
  bash tests/text/run.sh build/zmlx
fi
echo "== all tests passed"
