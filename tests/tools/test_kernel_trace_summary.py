#!/usr/bin/env python3
"""tools/kernel_trace_summary.py on synthetic traces whose answers are known.

Record fields: index, start ns, release ns, grid x, grid y, block. Each
kernel's dur is the next kernel's release minus its own.
"""
import os
import subprocess
import sys
import tempfile

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "kernel_trace_summary.py")


def waited(i):
    """A start this many ns before the release, different kernel to kernel."""
    return 300 + 170 * (i % 5)


def run(records, block_lines=()):
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
        f.write("noise before the trace\n")
        for i, (start, release, gx, gy, block) in enumerate(records):
            f.write(f"[zmlx trace] {i} {start} {release} {gx} {gy} {block}\n")
        f.writelines(line + "\n" for line in block_lines)
        path = f.name
    try:
        out = subprocess.run([sys.executable, TOOL, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return out


def check(cond, what, out):
    if not cond:
        sys.exit(f"FAIL: {what}\n--- output ---\n{out}")


# Six identical layers of three kernels (1, 2 and 4 us), then an lm_head.
layer = [((1, 1, 256), 1000), ((640, 1, 256), 2000), ((48, 8, 128), 4000)]
recs, t = [], 0
for _ in range(6):
    for (gx, gy, block), d in layer:
        recs.append((t - waited(len(recs)), t, gx, gy, block))
        t += d
recs.append((t - 500, t, 4748, 1, 256))
recs.append((t + 90000 - 500, t + 90000, 1, 1, 1024))  # argmax: the last kernel, no dur
out = run(recs)
check("layer period 3" in out, "the period of a uniform model", out)
check("per layer 7.00 us" in out, "the per-layer sum", out)
check("grid    48 x 8   block  128     6 kernels  dur    24.00 us" in out, "the gate+up shape total", out)
check("grid  4748 x 1   block  256     1 kernels  dur    90.00 us" in out, "the lm_head total", out)
check("by launch shape (19 kernels, 132.0 us" in out, "the step total", out)

# Layers that differ (a conv layer, then an attention layer, irregularly):
# no period tiles them, and the shape totals still add up.
kinds = {"conv": [((7, 1, 128), 1500)], "attn": [((32, 12, 128), 6000), ((32, 1, 128), 2500)]}
recs, t = [], 0
for k in ["conv", "attn", "conv", "conv", "attn", "attn", "conv", "attn", "conv", "conv", "conv", "attn"]:
    for (gx, gy, block), d in kinds[k]:
        recs.append((t - waited(len(recs)), t, gx, gy, block))
        t += d
recs.append((t, t + 1, 1, 1, 1024))
out = run(recs)
check("grid    32 x 12  block  128     5 kernels  dur    30.00 us" in out, "attention totals without a period", out)
check("grid     7 x 1   block  128     7 kernels  dur    10.50 us" in out, "conv totals without a period", out)

# LFM2-like: a dense first layer, then conv and attention layers in an
# irregular order, each opening with a norm and sharing the MoE half (which
# opens with the second norm); then the final norm, lm_head and argmax. The
# step is cut before every second norm: two kinds of layer.
NORM = ((1, 1, 256), 1000)
MOE = [NORM, ((4, 1, 256), 2000), ((1, 1, 128), 2000), ((56, 4, 128), 11000), ((128, 1, 512), 7000)]
kinds = {
    "dense": [NORM, ((384, 1, 256), 3000), ((16, 1, 256), 2000), ((256, 1, 256), 3000), NORM,
              ((448, 1, 256), 5000), ((96, 1, 256), 3000)],
    "conv": [NORM, ((384, 1, 256), 3000), ((16, 1, 256), 2000), ((256, 1, 256), 3000)] + MOE,
    "attn": [NORM, ((320, 1, 256), 4000), ((32, 12, 128), 6000), ((32, 1, 64), 2500), ((256, 1, 256), 3500)] + MOE,
}
order = ["dense", "conv", "conv", "attn", "conv", "conv", "conv", "attn", "conv", "attn", "conv", "attn", "conv"]
recs, t = [], 0
for k in order + ["final"]:
    for (gx, gy, block), d in kinds.get(k, [NORM, ((4096, 1, 256), 50000), ((1, 1, 1024), 1)]):
        recs.append((t - waited(len(recs)), t, gx, gy, block))
        t += d
out = run(recs)
check("layer kinds (cut before every second grid 1 x 1 block 256)" in out, "the cut: every second norm", out)
check(f"kind: {order.count('conv')} layers of 9 kernels" in out, "the conv layers", out)
check(f"kind: {order.count('attn')} layers of 10 kernels" in out, "the attention layers", out)
check("per layer 32.00 us (mean over 8 layers)" in out, "a conv layer's sum", out)
check("per layer 40.00 us (mean over 4 layers)" in out, "an attention layer's sum", out)
# A uniform model prints no kinds (one kind: the period's table says it all).
out = run([(i * 1000 - 200, i * 1000, *([(1, 1, 256), (640, 1, 256), (48, 8, 128)][i % 3])) for i in range(30)])
check("layer period 3" in out and "layer kinds" not in out, "no kinds for a uniform model", out)

# Block lines (ZMLX_KERNEL_TRACE_BLOCKS=1): the 640-block kernel of each of
# six uniform layers has one block resident before its release and one that
# started after it, with phase marks; lines in the older form (no marks, or
# no SM) still parse.
recs, blines, t = [], [], 0
for layer_i in range(6):
    for (gx, gy, block), d in layer:
        i = len(recs)
        recs.append((t - waited(i), t, gx, gy, block))
        if gx == 640:
            m = lambda off: [t + 200 + off, t + 1000 + off, t + 1200 + off, t + 600 + off]  # marks 0, 1, 2, 3
            blines.append(f"[zmlx trace block] {i} {t - 500} {t} {t + 1500} 640 1 {' '.join(map(str, m(0)))} 3")
            tail = "" if layer_i == 0 else " " + " ".join(map(str, m(100))) + ("" if layer_i == 1 else " 7")
            blines.append(f"[zmlx trace block] {i} {t + 100} {t + 100} {t + 1800} 640 1{tail}")
        t += d
recs.append((t - 500, t, 4748, 1, 256))
recs.append((t + 90000 - 500, t + 90000, 1, 1, 1024))
out = run(recs, blines)
row = next((l for l in out.splitlines() if "grid   640 x 1" in l and "pos" in l), "")
check("ends early/late  1.50 /  1.80 us" in row, "the early and late blocks' ends", out)
# Marks count from each block's own release; the medians are over the blocks with marks (6 early, 5 late).
check("phases m0  0.20 m3  0.60 m1  1.00 m2  1.20 end  1.50" in row, "the phase medians", out)
# SMs: one (SM 3) in the layers whose late block has no SM field, two (3 and 7) in the others; the mean
# over the 5 layers the table covers (the first 5 of 6: 1, 1, 2, 2, 2) and the most blocks on one SM.
check("SMs   1.6, up to 1 a SM" in row, "the SMs a kernel ran on", out)
print("kernel_trace_summary: ok")
