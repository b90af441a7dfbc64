#!/usr/bin/env bash
# Packs what the GPU machine needs into build-device/ (git-ignored): the
# binaries built here (zmlx, zmlx_tests, gpu_bandwidth) and the shared
# libraries its image may lack. A device `run` then carries that folder:
#   run(command="bash bench/device.sh", carry=["build-device"])
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
if ! bash scripts/build.sh zmlx zmlx_tests gpu_bandwidth cuda_kernels_bench gemm_bench phase_sync_bench weight_layout_bench >"$log" 2>&1; then
  grep -E 'error|FAILED' "$log" | head -20; tail -5 "$log"; rm -f "$log"
  echo "device_bundle: the build failed; build-device/ was not updated" >&2
  exit 1
fi
# SM80=1: also the GPU tests built for sm_80 alone (build-sm80/), which
# device.sh runs with PDL off: on a Hopper card the driver compiles their
# PTX at load, so the Ampere form of every kernel runs there too.
if [[ "${SM80:-0}" == 1 ]]; then
  cmake -S . -B build-sm80 -G Ninja -DCMAKE_BUILD_TYPE=Release -DZMLX_CUDA_ARCHS=80 >/dev/null
  if ! ninja -C build-sm80 zmlx_tests >"$log" 2>&1; then
    grep -E 'error|FAILED' "$log" | head -20; rm -f "$log"
    echo "device_bundle: the sm_80 build failed; build-device/ was not updated" >&2
    exit 1
  fi
fi
rm -f "$log"
rm -rf build-device
mkdir -p build-device/lib
cp build/zmlx build/zmlx_tests build/gpu_bandwidth build/cuda_kernels_bench build/gemm_bench build/phase_sync_bench build/weight_layout_bench build-device/
[[ "${SM80:-0}" == 1 ]] && cp build-sm80/zmlx_tests build-device/zmlx_tests80
for lib in libfmt libpcre2-8 libgomp libgtest; do
  path=$(ldd build/zmlx_tests | awk -v l="$lib" 'index($1, l ".so") == 1 {print $3}')
  [[ -n "$path" ]] && cp -L "$path" build-device/lib/
done
du -sh build-device
