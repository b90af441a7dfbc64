#!/usr/bin/env bash
# Puts build/zmlx and the shared libraries that the GPU machine's image may lack (libfmt, libpcre2-8,
# libgomp) into tools/oracle/bin/ (git-ignored), so a device `run` can carry that folder:
#   run(command="export LD_LIBRARY_PATH=$PWD/tools/oracle/bin/lib; python3 tools/oracle/oracle.py \
#                --zmlx tools/oracle/bin/zmlx --out $OUT --prompts 16", carry=["tools/oracle/bin"])
# Every other library the binary links outside the C/C++ runtime (OpenMPI's, hwloc, libevent, libudev,
# libcudart, ...) goes to tools/oracle/bin/fallback/: run_all.sh adds that folder to LD_LIBRARY_PATH only when
# `ldd` finds a library missing on the machine it runs on (the machine's own copies win otherwise).
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ -x build/zmlx ]] || { echo "build/zmlx missing: bash scripts/build.sh zmlx" >&2; exit 1; }
rm -rf tools/oracle/bin
mkdir -p tools/oracle/bin/lib tools/oracle/bin/fallback
cp build/zmlx tools/oracle/bin/
for lib in libfmt libpcre2-8 libgomp; do
  path=$(ldd build/zmlx | awk -v l="$lib" 'index($1, l ".so") == 1 {print $3}')
  [[ -n "$path" ]] && cp -L "$path" tools/oracle/bin/lib/
done
ldd build/zmlx | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
  case $name in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libstdc++.so*|libgcc_s.so*|libz.so*|ld-linux*) ;;
    libfmt.so*|libpcre2-8.so*|libgomp.so*) ;;
    *) cp -L "$path" tools/oracle/bin/fallback/ ;;
  esac
done
ls -l tools/oracle/bin tools/oracle/bin/lib tools/oracle/bin/fallback
sha256sum tools/oracle/bin/zmlx
