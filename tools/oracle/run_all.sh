#!/usr/bin/env bash
# Runs the four oracles in full mode (transformers reference; needs torch + transformers, a GPU if there is
# one) one after another, each under its own time limit, and collects everything in one folder:
#   ./oracle-results-<UTC time>/ (or, with $OUT set, $OUT/oracle-results.tgz of it, without the logits.npz files
#   unless KEEP_LOGITS=1): <family>/{results.json,logits.npz,summary.txt}, <family>.log (stdout + stderr),
#   status.txt (exit status and seconds per oracle), env.txt, monitor.txt.
# One oracle failing, or running out of time, does not stop the others.
#
# Prepare on the dev machine:  bash scripts/build.sh zmlx && bash tools/oracle/prepare_bin.sh
# GPU machine (device run, carry ["tools/oracle/bin"]):         bash tools/oracle/run_all.sh
# Options via the environment: ZMLX (binary, default tools/oracle/bin/zmlx, else build/zmlx), PROMPTS (16),
# PYTHON (python3), ONLY (space-separated subset of: qwen3_moe glm lfm2 dense), EXTRA (more arguments for
# every oracle). Time limits (seconds): T_QWEN (420), T_GLM (420), T_LFM2 (540), T_DENSE (420). The oracles
# themselves print as they go (PYTHONUNBUFFERED), so a timed-out log still shows how far it came.
# The four limits add up to 30 min: where one command may run at most 10 min (the device `run`), split the
# work over calls with ONLY (e.g. ONLY="qwen3_moe glm", then ONLY=lfm2, then ONLY=dense, each with its own $OUT)
# and lower the limits so that they fit. Measured on an H100 (2026-11-26): 18-31 s per oracle, so
# T_QWEN=75 T_GLM=70 T_LFM2=75 T_DENSE=65 fits one call with room to spare.
# While the oracles run, a monitor writes the load and the busiest processes every 15 s to monitor.txt (MONITOR=0
# turns it off): with the oracles' own progress lines and thread snapshots of slow zmlx calls (--zmlx-slow), a
# run cut off by a time limit shows where it stopped and what the machine was doing.
set -uo pipefail
cd "$(dirname "$0")/../.."
# A device run brings back at most 8 files from $OUT: with $OUT set, the results are gathered in a
# scratch folder and packed into $OUT/oracle-results.tgz (plus status.txt beside it).
if [[ -n ${OUT:-} ]]; then root=$(mktemp -d); else root=oracle-results-$(date -u +%Y%m%d-%H%M%S); fi
mkdir -p "$root"
py=${PYTHON:-python3}
zmlx=${ZMLX:-}
if [[ -z $zmlx ]]; then
  if [[ -x tools/oracle/bin/zmlx ]]; then zmlx=tools/oracle/bin/zmlx; else zmlx=build/zmlx; fi
fi
[[ -x $zmlx ]] || { echo "no zmlx binary at $zmlx (bash tools/oracle/prepare_bin.sh)" >&2; exit 2; }
[[ -d tools/oracle/bin/lib ]] && export LD_LIBRARY_PATH=$PWD/tools/oracle/bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Libraries the binary links that this machine lacks (OpenMPI's, libcudart, ...): prepare_bin.sh keeps copies in
# bin/fallback, used only when ldd reports one missing.
fallback=$(dirname "$zmlx")/fallback
if ldd "$zmlx" 2>/dev/null | grep -q "not found" && [[ -d $fallback ]]; then
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(cd "$fallback" && pwd)
fi
export PYTHONUNBUFFERED=1
prompts=${PROMPTS:-16}
only=${ONLY:-qwen3_moe glm lfm2 dense}
{
  date -u +%FT%TZ
  echo "zmlx: $zmlx $(sha256sum "$zmlx" | cut -c1-16)"
  git log -1 --format='commit %H %s' 2>/dev/null
  $py -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
  $py -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1
  echo "nproc $(nproc); loadavg $(cat /proc/loadavg)"
  env | grep -E '^(OMP_|GOMP_|KMP_|MKL_|OPENBLAS_)' || echo "no OMP_/GOMP_/KMP_/MKL_/OPENBLAS_ variables"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$zmlx" | grep -E "not found|mpi|cudart|gomp" || true
} > "$root/env.txt"
cat "$root/env.txt"

monitor_pid=
if [[ ${MONITOR:-1} != 0 ]]; then
  ( while :; do
      echo "== $(date -u +%T) load $(cut -d' ' -f1-4 /proc/loadavg)"
      ps -eo pid,ppid,nlwp,pcpu,stat,etimes,comm --sort=-pcpu 2>/dev/null | head -8
      sleep 15
    done ) > "$root/monitor.txt" 2>&1 &
  monitor_pid=$!
fi

declare -A script=([qwen3_moe]=oracle.py [glm]=oracle_glm.py [lfm2]=oracle_lfm2.py [dense]=oracle_dense.py)
declare -A limit=([qwen3_moe]=${T_QWEN:-420} [glm]=${T_GLM:-420} [lfm2]=${T_LFM2:-540} [dense]=${T_DENSE:-420})
: > "$root/status.txt"
worst=0
for fam in $only; do
  [[ -n ${script[$fam]:-} ]] || { echo "unknown oracle '$fam'" >&2; worst=2; continue; }
  echo "== $fam: ${script[$fam]} (limit ${limit[$fam]} s)"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout -k 20 "${limit[$fam]}" $py "tools/oracle/${script[$fam]}" --zmlx "$zmlx" --out "$root/$fam" \
    --prompts "$prompts" ${EXTRA:-} > "$root/$fam.log" 2>&1 < /dev/null
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) what=PASS ;;
    1) what=FAIL ;;
    124|137) what="TIMEOUT after ${limit[$fam]} s" ;;
    *) what="ERROR rc=$rc" ;;
  esac
  echo "$fam: $what (${secs} s)" | tee -a "$root/status.txt"
  tail -n 25 "$root/$fam.log"
  (( rc > worst )) && worst=$rc
done
[[ -n $monitor_pid ]] && kill "$monitor_pid" 2>/dev/null
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  # logits.npz (several MB per oracle) stays out unless KEEP_LOGITS=1: a device run brings back files of at most
  # 16 MiB, and a tgz with all four archives is larger (it was left behind once).
  if [[ ${KEEP_LOGITS:-0} == 1 ]]; then tar czf "$OUT/oracle-results.tgz" -C "$root" .
  else tar czf "$OUT/oracle-results.tgz" --exclude=logits.npz -C "$root" .; fi
  cp "$root/status.txt" "$OUT/status.txt"
  echo "results in $OUT/oracle-results.tgz"
else
  echo "results in $root"
fi
cat "$root/status.txt"
exit $(( worst == 0 ? 0 : 1 ))
