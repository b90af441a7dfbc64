#!/usr/bin/env python3
"""Per-layer summary of a decode-step kernel trace.

A build configured with -DZMLX_KERNEL_TRACE=ON prints, with
ZMLX_KERNEL_TRACE_STEP=N, one `[zmlx trace]` line per kernel of the N-th
replayed decode step (src/zmlx/backend/cuda/kernel_trace.h). This script finds
the layer period from the kernels' launch shapes and prints, for each kernel
position in a layer, the mean of:
  dur     release(next kernel) - release(this kernel): what the kernel adds to
          the step (its work after its wait, plus the next one's release);
  waited  release(this kernel) - start(this kernel): how long its first block
          sat at the programmatic-launch wait (how early it was launched).

  zmlx-trace bench MODEL ... 2> trace.log; tools/kernel_trace_summary.py trace.log
"""
import re
import statistics
import sys


def main(path):
    recs = []
    for line in open(path):
        m = re.match(r"\[zmlx trace\] (\d+) (-?\d+) (-?\d+) (\d+) (\d+) (\d+)$", line.strip())
        if m:
            recs.append(tuple(int(x) for x in m.groups()))
    if len(recs) < 4:
        sys.exit(f"{path}: fewer than 4 [zmlx trace] lines (a -DZMLX_KERNEL_TRACE=ON build, ZMLX_KERNEL_TRACE_STEP=N?)")
    n = len(recs)
    shape = [(r[3], r[4], r[5]) for r in recs]
    # The layer period: the shift under which the most launch shapes repeat.
    period = max(range(2, min(64, n // 3)), key=lambda p: (sum(shape[i] == shape[i + p] for i in range(n - p)), -p))
    start = next((i for i in range(n - 2 * period)
                  if all(shape[i + j] == shape[i + j + period] for j in range(period))), None)
    print(f"{n} kernels, step {(recs[-1][2] - recs[0][2]) / 1000:.1f} us (first to last release); layer period {period}")
    if start is None:
        sys.exit("no repeating layer found")
    layers = (n - start) // period
    total = 0.0
    for j in range(period):
        durs, waits = [], []
        for layer in range(layers - 1):
            i = start + layer * period + j
            durs.append(recs[i + 1][2] - recs[i][2])
            waits.append(recs[i][2] - recs[i][1])
        d = statistics.mean(durs)
        total += d
        g = shape[start + j]
        print(f"  pos {j:2d}  grid {g[0]:5d} x {g[1]:<3d} block {g[2]:4d}  dur {d / 1000:6.2f} us"
              f"  waited {statistics.mean(waits) / 1000:6.2f} us")
    print(f"per layer {total / 1000:.2f} us (mean over {layers - 1} layers)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
