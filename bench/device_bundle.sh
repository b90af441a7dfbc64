#!/usr/bin/env bash
# Packs what the GPU machine needs into build-device/ (git-ignored): the
# binaries built here (zmlx, zmlx_tests, gpu_bandwidth) and the shared
# libraries its image may lack. A device `run` then carries that folder:
#   run(command="bash bench/device.sh", carry=["build-device"])
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh zmlx zmlx_tests gpu_bandwidth >/dev/null
rm -rf build-device
mkdir -p build-device/lib
cp build/zmlx build/zmlx_tests build/gpu_bandwidth build-device/
for lib in libfmt libpcre2-8 libgomp libgtest; do
  path=$(ldd build/zmlx_tests | awk -v l="$lib" 'index($1, l ".so") == 1 {print $3}')
  [[ -n "$path" ]] && cp -L "$path" build-device/lib/
done
du -sh build-device
