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
          sat at the programmatic-launch wait (how early it was launched);
  late    of its blocks, how many started after that release (they could not
          become resident earlier: the kernels before it held the SMs' registers,
          shared memory or threads), so loaded nothing before the wait;
  last    when its last block started, after the release;
  end     when its last block ended, after the release: dur - end is the
          boundary to the next kernel (its blocks' exit, the memory flush,
          the next one's release);
  ends    with ZMLX_KERNEL_TRACE_BLOCKS=1 (a line per block): when the last
          block that started before the release ended, and when the last late
          one did (what the late blocks cost the kernel);
  phases  with ZMLX_KERNEL_TRACE_BLOCKS=1, for kernels with ZMLX_TRACE_MARK
          points: the median over the kernel's blocks of when the block's last
          warp passed marks 0, 3, 1, 2 (that order: the kernels use 3 for a
          point between 0 and 1) and when the block ended, each after the
          block's own release (the kernel's comments say what each mark ends);
  SMs     with block lines from a build that records each block's SM: how
          many SMs the kernel's blocks ran on and the most any one SM ran.
          An early-launched grid fills the SMs that have room when it is
          launched, up to its occupancy, so a kernel of 256 blocks can run 4
          a SM on 70 SMs while the others get none; the SMs with the most
          blocks then set its end.
For models whose layers differ (LFM2's conv and attention layers), where one
period cannot describe the step, the step is instead cut into layers at a
launch shape that starts every layer (or every second occurrence of one: the
norm kernels come twice a layer), and the same table is printed for each kind
of layer that occurs at least three times (a kind seen once, such as a dense
first layer, is left out). Last, the whole step by launch shape: how many
kernels of each shape and their total dur (kernels of one shape may be
different kernels; the grid usually tells).

  zmlx-trace bench MODEL ... 2> trace.log; tools/kernel_trace_summary.py trace.log
"""
import re
import collections
import statistics
import sys


def main(path):
    recs = []
    block_ends = {}  # kernel index -> [(start, end)] of its blocks (ns from the step's first release)
    block_phases = {}  # kernel index -> [(mark 0, 3, 1, 2, end)] of its blocks, ns after the block's release
    block_sms = {}  # kernel index -> Counter {SM: blocks that ran there}
    for line in open(path):
        # ... grid_x grid_y, then (newer builds) 4 phase marks, then (newer still) the SM
        b = re.match(r"\[zmlx trace block\] (-?\d+) (-?\d+) (-?\d+) (-?\d+) (\d+) (\d+)((?: -?\d+){4})?(?: (\d+))?$",
                     line.strip())
        if b:
            k, start, go, end = (int(x) for x in b.groups()[:4])
            if k >= 0:
                block_ends.setdefault(k, []).append((start, end))
                if b.group(8) is not None:
                    block_sms.setdefault(k, collections.Counter())[int(b.group(8))] += 1
                if b.group(7):
                    marks = [int(x) for x in b.group(7).split()]
                    if any(v >= 0 for v in marks):
                        block_phases.setdefault(k, []).append(
                            tuple(marks[i] - go if marks[i] >= 0 else None for i in (0, 3, 1, 2)) + (end - go,))
            continue
        m = re.match(r"\[zmlx trace\] (\d+) (-?\d+) (-?\d+) (\d+) (\d+) (\d+)((?: -?\d+){3,4})?$", line.strip())
        if m:
            extra = tuple(int(x) for x in m.group(7).split()) if m.group(7) else ()
            extra = extra + (0,) * (4 - len(extra))
            recs.append(tuple(int(x) for x in m.groups()[:6]) + extra)
    if len(recs) < 4:
        sys.exit(f"{path}: fewer than 4 [zmlx trace] lines (a -DZMLX_KERNEL_TRACE=ON build, ZMLX_KERNEL_TRACE_STEP=N?)")
    n = len(recs)
    shape = [(r[3], r[4], r[5]) for r in recs]
    # The layer period: the shift under which the most launch shapes repeat.
    period = max(range(2, min(64, n // 3)), key=lambda p: (sum(shape[i] == shape[i + p] for i in range(n - p)), -p))
    start = next((i for i in range(n - 2 * period)
                  if all(shape[i + j] == shape[i + j + period] for j in range(period))), None)
    print(f"{n} kernels, step {(recs[-1][2] - recs[0][2]) / 1000:.1f} us (first to last release); layer period {period}")
    # Per kernel: the last end among blocks that started before its release, and among those after.
    ends = {}
    for k, v in block_ends.items():
        if k >= n:
            continue
        go = recs[k][2]
        early = [e for (st, e) in v if st <= go]
        late = [e for (st, e) in v if st > go]
        ends[k] = (max(early) - go if early else None, max(late) - go if late else None)
    kinds = layer_kinds(shape)
    if kinds and len(kinds[1]) > 1:  # layers differ: a table for each kind, not the period's
        cut, groups = kinds
        print(f"layer kinds (cut before every {'' if cut[1] == 1 else 'second '}grid {cut[0][0]} x {cut[0][1]} "
              f"block {cut[0][2]}):")
        for sig, starts in groups:
            print(f"kind: {len(starts)} layers of {len(sig)} kernels")
            table(recs, shape, [i for i in starts if i + len(sig) < n], len(sig), block_phases, ends, block_sms)
    elif start is None:
        print("no repeating layer found")
    else:
        layers = (n - start) // period
        table(recs, shape, [start + layer * period for layer in range(layers - 1)], period, block_phases, ends,
              block_sms)
    by_shape(recs, shape)


def layer_kinds(shape):
    """Cuts the step into layers before every k-th occurrence (k = 1, 2) of one
    launch shape and groups the layers by their sequence of shapes, keeping
    the sequences seen at least 3 times. Of the cuts whose kept layers cover
    at least 90 % of the most any cut covers, the one with the fewest kinds,
    then the earliest first cut (the step opens with a layer's first kernel,
    so that cut falls on layer starts), then the fewest cuts. Returns
    ((shape, k), [(sequence, [first kernel index of each layer])]), most
    frequent first, or None."""
    where = {}
    for i, g in enumerate(shape):
        where.setdefault(g, []).append(i)
    cands = []
    for g, occ in where.items():
        for k in (1, 2):
            for off in range(k):
                cuts = occ[off::k]
                if len(cuts) < 4:
                    continue
                groups = {}
                for a, b in zip(cuts, cuts[1:]):
                    groups.setdefault(tuple(shape[a:b]), []).append(a)
                kept = sorted(((sig, st) for sig, st in groups.items() if len(st) >= 3), key=lambda x: -len(x[1]))
                if kept:
                    cands.append((sum(len(sig) * len(st) for sig, st in kept), len(kept), cuts[0], len(cuts), (g, k),
                                  kept))
    if not cands:
        return None
    most = max(c[0] for c in cands)
    best = min((c for c in cands if c[0] >= 0.9 * most), key=lambda c: (c[1], c[2], c[3]))
    return best[4], best[5]


def table(recs, shape, starts, period, block_phases, ends, block_sms):
    """The per-position table over the layers starting at `starts`, each `period` kernels long."""
    if not starts:
        return
    total = 0.0
    for j in range(period):
        durs, waits, blocks, late, last, end, e_early, e_late, sms_used, sm_most = [], [], [], [], [], [], [], [], [], []
        phases = [[] for _ in range(5)]
        for s0 in starts:
            i = s0 + j
            for ph in block_phases.get(i, ()):
                for q in range(5):
                    if ph[q] is not None:
                        phases[q].append(ph[q])
            durs.append(recs[i + 1][2] - recs[i][2])
            waits.append(recs[i][2] - recs[i][1])
            blocks.append(recs[i][6])
            late.append(recs[i][7])
            last.append(recs[i][8])
            end.append(recs[i][9])
            if i in block_sms:
                sms_used.append(len(block_sms[i]))
                sm_most.append(max(block_sms[i].values()))
            if i in ends:
                if ends[i][0] is not None:
                    e_early.append(ends[i][0])
                if ends[i][1] is not None:
                    e_late.append(ends[i][1])
        d = statistics.mean(durs)
        total += d
        g = shape[starts[0] + j]
        print(f"  pos {j:2d}  grid {g[0]:5d} x {g[1]:<3d} block {g[2]:4d}  dur {d / 1000:6.2f} us"
              f"  waited {statistics.mean(waits) / 1000:6.2f} us"
              + (f"  late {statistics.mean(late):6.1f} of {statistics.mean(blocks):5.0f}"
                 f"  last {statistics.mean(last) / 1000:6.2f} us" if any(blocks) else "")
              + (f"  end {statistics.mean(end) / 1000:6.2f} us" if all(end) else "")
              + (f"  ends early/late {statistics.mean(e_early) / 1000:5.2f} / "
                 + (f"{statistics.mean(e_late) / 1000:5.2f} us" if e_late else "  -  ") if e_early else "")
              + ("  phases " + " ".join(f"{n} {statistics.median(v) / 1000:5.2f}" if v else f"{n}   -  "
                                         for n, v in zip(("m0", "m3", "m1", "m2", "end"), phases))
                 if any(phases[:4]) else "")
              + (f"  SMs {statistics.mean(sms_used):5.1f}, up to {max(sm_most)} a SM" if sms_used else ""))
    print(f"per layer {total / 1000:.2f} us (mean over {len(starts)} layers)")


def by_shape(recs, shape):
    """The step's dur summed by launch shape, largest first."""
    total, count = {}, {}
    for i in range(len(recs) - 1):
        d = recs[i + 1][2] - recs[i][2]
        total[shape[i]] = total.get(shape[i], 0) + d
        count[shape[i]] = count.get(shape[i], 0) + 1
    step = sum(total.values())
    print(f"by launch shape ({len(recs) - 1} kernels, {step / 1000:.1f} us; the last kernel has no dur):")
    for g in sorted(total, key=lambda g: -total[g]):
        print(f"  grid {g[0]:5d} x {g[1]:<3d} block {g[2]:4d}  {count[g]:4d} kernels  dur {total[g] / 1000:8.2f} us"
              f"  ({100 * total[g] / step:4.1f} %, {total[g] / count[g] / 1000:5.2f} us each)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
