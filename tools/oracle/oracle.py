#!/usr/bin/env python3
"""External-truth check: zmlx (CPU) against Hugging Face transformers on a small random Qwen3-MoE.

What it does (default mode, needs torch + transformers, a GPU if there is one):
  1. builds a small random-init Qwen3MoeForCausalLM (fixed seed; re-initialised: matrices N(0, 0.02),
     embedding N(0, 0.3), lm_head N(0, 0.1) so the logits are not flat, with half its rows scaled by
     exp(|z|) (HEAD_ROW_SPREAD: so that the argmax is not a near-tie), norm weights 1 + N(0, 0.1)),
     casts it to bf16 and save_pretrained()s it (safetensors);
  2. converts it with the zmlx binary twice: --dtype bf16 and --bits 4 --group-size 64;
  3. reads the converted MLX safetensors back (U32 LSB-first packed weights, bf16 scales/biases,
     w = bf16(fp32(scale*q + bias))), unstacks switch_mlp into the layout the transformers model holds
     in memory (found at run time from model.state_dict()), and checks that the bf16 conversion
     reproduces every original weight bit for bit;
  4. runs the same prompts (random token ids, teacher forced) through
       - transformers in bf16 (eager attention, no_grad) with those weights  -> the reference,
       - transformers in fp32 with the same (bf16-valued) weights            -> noise floor of bf16 itself,
       - transformers in bf16 with router probabilities rounded to bf16 before top-k (as MLX/zmlx do),
       - a float64 NumPy forward with MLX semantics                          -> independent cross-check,
       - zmlx logits on the CPU: one pass, --chunk 16 (KV cache) and --chunk 1 (decode path);
  5. prints a table, writes results.json (and logits.npz) and exits 1 if a bar fails.

Bars (both the bf16 and the 4-bit conversion, zmlx one pass against transformers bf16):
  - relative L2 error ||z - h|| / ||h|| over all [T, V] logits <= 1e-2 for EVERY prompt;
  - argmax agreement >= 99% over all positions of all prompts together (per prompt is reported too;
    with 64 positions a prompt, 99% per prompt would mean no mismatch at all);
  - zmlx --chunk 16 equals the one-pass logits exactly (every prompt, both conversions);
  - the bf16 conversion reproduces every weight of the transformers model exactly;
  - the converted directories load in zmlx as written (if not, config.json is patched so the numeric
    checks still run, and the bar fails).

--selftest: no torch needed; the checkpoint is written by NumPy in the Hugging Face per-expert layout and
the NumPy forward with bf16 rounding at MLX's points (np_bf16) is the reference, as in the other oracles'
self-tests (before 2026-11-26 12:00 it was the float64 one, np_f64, which counts bf16 rounding itself as error).
Used to develop the tool on a machine without a GPU.

Usage:
  python3 tools/oracle/oracle.py --zmlx build/zmlx --out /tmp/oracle_out
  python3 tools/oracle/oracle.py --zmlx build/zmlx --out /tmp/oracle_out --selftest
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

# ----------------------------------------------------------------------------------------------
# bf16 helpers (NumPy has no bfloat16: keep the 16 bits in uint16, compute in float32/float64)


def bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, like torch's / MLX's float32 -> bfloat16 cast (inputs are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_round(x: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


# ----------------------------------------------------------------------------------------------
# safetensors with NumPy only

_ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
              "U32": np.uint32, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8}


def st_header(path: str) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def saved_dtypes(d: str) -> dict:
    """tensor name -> stored dtype, over every safetensors file of checkpoint folder d."""
    return {k: v["dtype"] for f in safetensors_files(d) for k, v in st_header(f).items() if k != "__metadata__"}


def hf_from_pretrained(Model, hf_dir: str, dtype, device):
    """Model.from_pretrained in eval mode on device, eager attention; `dtype=` (transformers 5) or `torch_dtype=`."""
    try:
        m = Model.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    except TypeError:
        m = Model.from_pretrained(hf_dir, torch_dtype=dtype, attn_implementation="eager")
    return m.to(device).eval()


def st_read(path: str) -> dict:
    """name -> (dtype string, raw numpy array with the stored bits)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            buf = f.read(b - a)
            arr = np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            out[name] = (info["dtype"], arr)
        return out


def st_write(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """tensors: name -> (dtype string, numpy array holding exactly those bits)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dt, arr = tensors[name]
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def safetensors_files(d: str) -> list:
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        wm = json.load(open(idx))["weight_map"]
        return sorted({os.path.join(d, f) for f in wm.values()})
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


# ----------------------------------------------------------------------------------------------
# MLX checkpoint -> logical float32 weights (bf16-valued)


def dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine: element c of a row is bits [bits*(c % per), ...) of word c // per (LSB first);
    w = scale * q + bias in float32 (the caller rounds to bf16)."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).astype(np.uint32)
    q = (wq[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    q = q.reshape(*wq.shape[:-1], wq.shape[-1] * per).astype(np.float32)
    G = scales.shape[-1]
    C = q.shape[-1]
    assert C % G == 0, (q.shape, scales.shape)
    gs = C // G
    w = q.reshape(*q.shape[:-1], G, gs) * scales[..., None] + biases[..., None]
    return w.reshape(q.shape).astype(np.float32)


def load_mlx(d: str) -> tuple:
    """Returns (weights: name -> float32 array of bf16 values, info: name -> {"bits", "group_size"} for
    quantized tensors). Quantized modules are dequantized as bf16(fp32(scale * q + bias))."""
    cfg = json.load(open(os.path.join(d, "config.json")))
    qcfg = cfg.get("quantization") or {}
    raw = {}
    for f in safetensors_files(d):
        raw.update(st_read(f))
    out, info = {}, {}
    for name, (dt, arr) in raw.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module + ".scales" in raw:
            ov = qcfg.get(module) if isinstance(qcfg.get(module), dict) else {}
            bits = int(ov.get("bits", qcfg.get("bits", 4)))
            gs_cfg = int(ov.get("group_size", qcfg.get("group_size", 64)))
            assert dt == "U32", (name, dt)
            sdt, s = raw[module + ".scales"]
            bdt, b = raw[module + ".biases"]
            s = bf16_bits_to_f32(s) if sdt == "BF16" else s.astype(np.float32)
            b = bf16_bits_to_f32(b) if bdt == "BF16" else b.astype(np.float32)
            cols = arr.shape[-1] * 32 // bits
            gs = cols // s.shape[-1]
            assert gs == gs_cfg, f"{name}: group size {gs} from shapes, {gs_cfg} from config.json"
            out[name] = bf16_round(dequantize(arr, s, b, bits))
            info[name] = {"bits": bits, "group_size": gs}
        elif dt == "BF16":
            out[name] = bf16_bits_to_f32(arr)
        else:
            out[name] = arr.astype(np.float32)
    return out, info


# ----------------------------------------------------------------------------------------------
# MLX names <-> the Hugging Face model's names (per-expert or fused experts, found from its keys)

_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def mlx_to_hf(mlx: dict, hf_shapes: dict) -> tuple:
    """Builds every tensor of the HF model (hf_shapes: name -> shape) from the MLX weights.
    Returns (weights, notes). Raises on a missing tensor or a shape no layout explains."""
    out, notes, used = {}, [], set()

    def sw(layer, proj):
        n = f"model.layers.{layer}.mlp.switch_mlp.{proj}.weight"
        used.add(n)
        return mlx[n]

    for name, shape in hf_shapes.items():
        shape = tuple(shape)
        if name in mlx:
            assert tuple(mlx[name].shape) == shape, f"{name}: MLX {mlx[name].shape}, HF {shape}"
            out[name] = mlx[name]
            used.add(name)
            continue
        m = _FUSED.match(name)
        if m:
            layer, kind = int(m.group(1)), m.group(2)
            if kind == "gate_up_proj":
                g, u = sw(layer, "gate_proj"), sw(layer, "up_proj")  # [E, I, D]
                E, I, D = g.shape
                a = np.concatenate([g, u], axis=1)  # [E, 2I, D]: rows 0..I-1 gate, I..2I-1 up
                if shape == (E, 2 * I, D):
                    if 2 * I == D:
                        notes.append(f"{name}: [E, 2I, D] assumed (2I == D); checked against the original")
                    out[name] = a
                elif shape == (E, D, 2 * I):
                    out[name] = np.ascontiguousarray(a.transpose(0, 2, 1))
                    notes.append(f"{name}: stored [E, D, 2I]")
                else:
                    raise ValueError(f"{name}: HF shape {shape} fits neither [E,2I,D] nor [E,D,2I] with "
                                     f"gate {g.shape}")
            else:
                dn = sw(layer, "down_proj")  # [E, D, I]
                E, D, I = dn.shape
                if shape == (E, D, I):
                    if D == I:
                        notes.append(f"{name}: [E, D, I] assumed (D == I); checked against the original")
                    out[name] = dn
                elif shape == (E, I, D):
                    out[name] = np.ascontiguousarray(dn.transpose(0, 2, 1))
                    notes.append(f"{name}: stored [E, I, D]")
                else:
                    raise ValueError(f"{name}: HF shape {shape} fits neither [E,D,I] nor [E,I,D]")
            continue
        m = _PER_EXPERT.match(name)
        if m:
            layer, e, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            a = sw(layer, proj)[e]
            assert tuple(a.shape) == shape, f"{name}: MLX expert {a.shape}, HF {shape}"
            out[name] = a
            continue
        raise KeyError(f"HF tensor {name} {shape}: no MLX tensor for it")
    unused = sorted(set(mlx) - used)
    if unused:
        raise KeyError(f"MLX tensors not used by the HF model: {unused[:5]} ({len(unused)})")
    return out, notes


# ----------------------------------------------------------------------------------------------
# Float64 NumPy forward with MLX semantics (MLX naming), an independent cross-check


def np_forward(W: dict, cfg: dict, ids: list, bf16: bool = False) -> np.ndarray:
    """float64 math; bf16=True rounds to bf16 where MLX does (spec 0.3/0.4/1.2): after every linear,
    norm, RoPE, attention output, residual add, router probabilities, SwiGLU and expert combine."""
    D = cfg["hidden_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    k_top = cfg["num_experts_per_tok"]
    E = cfg.get("num_experts", cfg.get("num_local_experts"))
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    norm_topk = cfg.get("norm_topk_prob", True)
    f = lambda n: W[n].astype(np.float64)  # noqa: E731
    R = (lambda x: bf16_round(np.asarray(x, dtype=np.float32)).astype(np.float64)) if bf16 else (lambda x: x)  # noqa: E731
    T = len(ids)
    h = f("model.embed_tokens.weight")[np.asarray(ids)]
    inv = (1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32 if bf16 else np.float64)
    ang = np.arange(T, dtype=inv.dtype)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :].astype(np.float64), np.sin(ang)[:, None, :].astype(np.float64)

    def rms(x, w):  # MLX: w * bf16(x * rsqrt(mean(x^2) + eps)), the product rounded again
        return R(w * R(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)))

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return R(np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1))

    def lin(x, w):
        return R(x @ w.T)

    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms(h, f(p + "input_layernorm.weight"))
        q = rope(rms(lin(a, f(p + "self_attn.q_proj.weight")).reshape(T, H, hd), f(p + "self_attn.q_norm.weight")))
        kk = rope(rms(lin(a, f(p + "self_attn.k_proj.weight")).reshape(T, Hkv, hd), f(p + "self_attn.k_norm.weight")))
        vv = lin(a, f(p + "self_attn.v_proj.weight")).reshape(T, Hkv, hd)
        kk, vv = np.repeat(kk, H // Hkv, axis=1), np.repeat(vv, H // Hkv, axis=1)  # head h -> kv h // rep
        s = np.einsum("thd,shd->hts", q, kk) * hd ** -0.5
        s[:, mask] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = R(np.einsum("hts,shd->thd", s, vv).reshape(T, H * hd))
        h = R(h + lin(o, f(p + "self_attn.o_proj.weight")))
        a = rms(h, f(p + "post_attention_layernorm.weight"))
        r = lin(a, f(p + "mlp.gate.weight"))
        r = np.exp(r - r.max(-1, keepdims=True))
        r = R(r / r.sum(-1, keepdims=True))
        top = np.argsort(-r, axis=-1, kind="stable")[:, :k_top]
        sc = np.take_along_axis(r, top, axis=-1)
        if norm_topk:
            sc = R(sc / R(sc.sum(-1, keepdims=True)))
        Wg, Wu, Wd = (f(p + f"mlp.switch_mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
        y = np.zeros_like(h)
        for e in range(E):
            rows, slot = np.nonzero(top == e)
            if rows.size == 0:
                continue
            x = a[rows]
            g, u = lin(x, Wg[e]), lin(x, Wu[e])
            y[rows] += R(sc[rows, slot][:, None] * lin(R(R(g / (1 + np.exp(-g))) * u), Wd[e]))
        h = R(h + R(y))
    return lin(rms(h, f("model.norm.weight")), f("lm_head.weight"))


# ----------------------------------------------------------------------------------------------
# comparisons


def compare(z: np.ndarray, ref: np.ndarray) -> dict:
    z, ref = z.astype(np.float64), ref.astype(np.float64)
    d = z - ref
    am_z, am_r = z.argmax(-1), ref.argmax(-1)
    return {"rel_l2": float(np.linalg.norm(d) / np.linalg.norm(ref)),
            "argmax_agree": float((am_z == am_r).mean()),
            "argmax_mismatches": int((am_z != am_r).sum()),
            "positions": int(z.shape[0]),
            "max_abs": float(np.abs(d).max()),
            "ref_logit_std": float(ref.std())}


def mismatch_details(z: np.ndarray, ref: np.ndarray, others: dict, prompt: int) -> list:
    """For each argmax mismatch: the reference's top-2 and gap, and zmlx's and other references' view."""
    out = []
    am_z, am_r = z.argmax(-1), ref.argmax(-1)
    for t in np.nonzero(am_z != am_r)[0]:
        r2 = np.argsort(-ref[t])[:2]
        row = {"prompt": prompt, "pos": int(t), "ref_top1": int(r2[0]), "ref_top2": int(r2[1]),
               "ref_gap": float(ref[t, r2[0]] - ref[t, r2[1]]), "zmlx_top1": int(am_z[t]),
               "zmlx_gap_ref_top1_minus_zmlx_top1": float(z[t, am_r[t]] - z[t, am_z[t]])}
        for k, o in others.items():
            row[f"{k}_top1"] = int(o[t].argmax())
        out.append(row)
    return out


def tie_stats(zs: list, refs: list) -> dict:
    """How many positions are argmax near-ties at bf16 resolution (the logits of both sides are bf16 values):
    exact ties and top-2 gaps of at most 2 bf16 ulps of the top logit, in the reference and in zmlx; how varied
    the reference's argmax is (distinct token ids, share of the most common one); and the argmax agreement on
    the positions that are not near-ties in the reference (informational, not a bar)."""
    z = np.concatenate(zs).astype(np.float64)
    r = np.concatenate(refs).astype(np.float64)

    def gaps(a):
        s = np.sort(a, axis=-1)
        top = np.abs(s[:, -1])
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(top, 1e-30))) - 7)
        return s[:, -1] - s[:, -2], ulp

    gr, ur = gaps(r)
    gz, _ = gaps(z)
    clear = gr > 2 * ur
    agree = z.argmax(-1) == r.argmax(-1)
    am = r.argmax(-1)
    return {"positions": int(r.shape[0]), "ref_exact_ties": int((gr == 0).sum()),
            "ref_gap_le_2ulp": int((~clear).sum()), "ref_near_tie_fraction": float((~clear).mean()),
            "ref_argmax_distinct_ids": int(np.unique(am).size),
            "ref_argmax_most_common_share": float(np.bincount(am).max() / am.size),
            "zmlx_exact_ties": int((gz == 0).sum()),
            "mismatches_at_ref_near_ties": int((~agree & ~clear).sum()),
            "mismatches_elsewhere": int((~agree & clear).sum()),
            "argmax_agree_excluding_ref_near_ties": float(agree[clear].mean()) if clear.any() else None}


def layers_zeroed_rel_l2(forward, W: dict, ids: list, ref: np.ndarray) -> float:
    """How much the attention / conv / MoE / MLP layers contribute to the logits: the float64 forward with every
    output projection (o_proj, out_proj, down_proj) zeroed, against the intact one (rel L2). Informational: a test
    model whose logits the layers hardly move would check little beyond the embedding and the head."""
    W0 = {k: (np.zeros_like(v) if any(t in k for t in ("o_proj.", "out_proj.", "down_proj.")) else v)
          for k, v in W.items()}
    return compare(forward(W0, ids), ref)["rel_l2"]


def aggregate(zs: list, refs: list) -> dict:
    z = np.concatenate([a.astype(np.float64) for a in zs])
    r = np.concatenate([a.astype(np.float64) for a in refs])
    return compare(z, r)


# ----------------------------------------------------------------------------------------------
# zmlx


# Limits of every command run(): a call still running after RUN_LIMITS["slow"] seconds is reported (with a
# snapshot of its threads, see proc_snapshot) and one still running after RUN_LIMITS["timeout"] seconds is
# killed and raises, so that a hung or very slow zmlx shows up in the log with the command that hung instead of
# an oracle stopped from outside with nothing printed. Set from --zmlx-timeout / --zmlx-slow (set_run_limits).
RUN_LIMITS = {"slow": 20.0, "timeout": 180.0}
# OpenMP threads of every zmlx command (OMP_NUM_THREADS in its environment; None: inherited). The test models
# are tiny, so more threads buy nothing, while an OpenMP team as large as the machine is very sensitive to any
# other load on it: on the 2-core dev machine a 0.15 s `zmlx logits` took 1.4-2 s next to two CPU-bound
# processes and up to 15 s during a C++ build. zmlx's CPU logits are bit-identical for 1, 3, 4 and 16 threads
# (checked on the LFM2 test model, bf16 and 4-bit, one pass / --chunk 128 / --chunk 1).
ZMLX_THREADS = {"n": None}


def set_run_limits(slow: float | None = None, timeout: float | None = None, threads: int | None = None) -> None:
    if slow is not None:
        RUN_LIMITS["slow"] = float(slow)
    if timeout is not None:
        RUN_LIMITS["timeout"] = float(timeout)
    if threads is not None:
        ZMLX_THREADS["n"] = (min(4, os.cpu_count() or 1) if threads < 0 else threads) or None


def _short(cmd: list) -> str:
    c = " ".join(cmd)
    return c if len(c) < 400 else c[:300] + " ... " + c[-90:]


def proc_snapshot(pid: int) -> dict:
    """What a running process is doing, from /proc (no gdb/strace on the GPU machine): its state, thread
    count, CPU seconds, RSS, allowed CPUs, and per thread state / CPU ticks / wait channel. Spinning
    threads show as R with growing ticks; a thread blocked in a futex or a read shows as S with its wchan."""
    snap: dict = {"pid": pid}
    try:
        st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
        for k in ("State", "Threads", "VmRSS", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches",
                  "Cpus_allowed_list"):
            if k in st:
                snap[k] = st[k].strip()
        tasks = []
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int)[:64]:
            with contextlib.suppress(OSError):
                f = open(f"/proc/{pid}/task/{tid}/stat").read()
                rest = f[f.rindex(")") + 2:].split()
                wchan = ""
                with contextlib.suppress(OSError):
                    wchan = open(f"/proc/{pid}/task/{tid}/wchan").read().strip()
                tasks.append(f"{tid}:{rest[0]}:{int(rest[11]) + int(rest[12])}t:{wchan or '-'}")
        snap["tasks"] = tasks
    except OSError as e:
        snap["error"] = str(e)
    return snap


def runtime_env() -> dict:
    """Facts that decide how fast the zmlx CPU runs can be: CPUs seen and allowed, load, thread-related
    environment variables, and the threads of this Python process (torch / OpenBLAS pools that might spin)."""
    env = {"cpu_count": os.cpu_count(), "loadavg": None,
           "vars": {k: v for k, v in os.environ.items()
                    if re.match(r"^(OMP_|GOMP_|KMP_|MKL_|OPENBLAS_|LD_LIBRARY_PATH$|CUDA_VISIBLE|PYTORCH_)", k)}}
    with contextlib.suppress(Exception):
        env["affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(Exception):
        env["loadavg"] = open("/proc/loadavg").read().split()[:3]
    with contextlib.suppress(Exception):
        states = [open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir("/proc/self/task")]
        env["python_threads"] = {"n": len(states), "running": states.count("R")}
    if "torch" in sys.modules:
        with contextlib.suppress(Exception):
            env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


def run(cmd: list, log: list, check=True, timeout: float | None = None, threads: int | None = None
        ) -> subprocess.CompletedProcess:
    """Runs cmd (stdin from /dev/null, output captured) under RUN_LIMITS (or `timeout`), with OMP_NUM_THREADS
    = threads (or ZMLX_THREADS) in its environment; see above."""
    t0 = time.time()
    limit = RUN_LIMITS["timeout"] if timeout is None else timeout
    slow = RUN_LIMITS["slow"]
    entry = {"cmd": _short(cmd)}
    env = None
    nt = threads if threads is not None else ZMLX_THREADS["n"]
    if nt:
        env = dict(os.environ, OMP_NUM_THREADS=str(nt))
        entry["omp_threads"] = nt
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                         env=env)
    try:
        try:
            out, err = p.communicate(timeout=slow if slow and (not limit or slow < limit) else limit or None)
        except subprocess.TimeoutExpired:
            if not (slow and (not limit or slow < limit)):
                raise
            snap = proc_snapshot(p.pid)
            entry["slow_snapshot"] = {"after_s": round(time.time() - t0, 1), "zmlx": snap, "env": runtime_env()}
            print(f"[run] still running after {time.time() - t0:.0f} s: {_short(cmd)[:200]}\n      {json.dumps(snap)[:900]}"
                  f"\n      parent: {json.dumps(entry['slow_snapshot']['env'])[:400]}", flush=True)
            out, err = p.communicate(timeout=(limit - (time.time() - t0)) if limit else None)
    except subprocess.TimeoutExpired:
        snap = proc_snapshot(p.pid)
        p.kill()
        out, err = p.communicate()
        entry.update(rc="timeout", s=round(time.time() - t0, 3), stdout=(out or "")[-2000:],
                     stderr=(err or "")[-2000:], timeout_snapshot=snap)
        log.append(entry)
        print(f"[run] KILLED after {time.time() - t0:.0f} s (limit {limit:g} s): {_short(cmd)[:200]}\n"
              f"      {json.dumps(snap)[:1500]}", flush=True)
        raise RuntimeError(f"command still running after {limit:g} s, killed: {_short(cmd)[:300]}; "
                           f"threads: {json.dumps(snap)[:600]}")
    cp = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    entry.update(rc=p.returncode, s=round(time.time() - t0, 3), stdout=out[-2000:], stderr=err[-2000:])
    log.append(entry)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)[:300]}\n{out[-2000:]}\n"
                           f"{err[-3000:]}")
    return cp


def zmlx_time_summary(log: list) -> dict:
    """Seconds spent in zmlx commands, by kind (convert, logits one pass / chunked / --chunk 1)."""
    out: dict = {}
    for e in log:
        c = e["cmd"].split()
        kind = c[1] if len(c) > 1 else "?"
        if "probe_t" in e["cmd"]:
            kind = "thread probe"
        elif kind == "logits":
            kind += " --chunk 1" if c[-2:] == ["--chunk", "1"] else (" chunked" if "--chunk" in c else " one pass")
        s = e.get("s", 0.0)
        k = out.setdefault(kind, {"n": 0, "s": 0.0, "max_s": 0.0})
        k["n"] += 1
        k["s"] = round(k["s"] + s, 2)
        k["max_s"] = max(k["max_s"], s)
    return out


def thread_probe(zmlx: str, model: str, ids: list, work: str, log: list) -> dict:
    """Times one `zmlx logits --chunk 1` (every token a decode step: the most OpenMP fork/joins per second of
    work) with OMP_NUM_THREADS = all CPUs, 4 and 1, where the zmlx runs will happen (after the references, so
    whatever transformers / torch / NumPy left running in this process is there too). Informational: it shows
    whether the zmlx team size matters on this machine; each probe is cut off after 30 s."""
    out = {}
    for nt in sorted({os.cpu_count() or 1, 4, 1}, reverse=True):
        t = time.time()
        try:
            zmlx_logits(zmlx, model, ids, os.path.join(work, f"probe_t{nt}.npy"), 1, log, threads=nt, timeout=30)
            out[str(nt)] = round(time.time() - t, 3)
        except Exception as e:  # noqa: BLE001
            out[str(nt)] = f"{type(e).__name__} after {time.time() - t:.0f} s"
    return out



def announce_zmlx_runs(tag: str, v: str, seconds: float, zmlx: str, model: str, probe_ids: list, work: str,
                       log: list, results: dict) -> None:
    """Prints that conversion v's references are done and how zmlx will run; for the first conversion also
    times the thread probe (thread_probe) and records it in results["env"]."""
    print(f"[{tag}] {v}: references done ({seconds:.1f}s); zmlx runs with OMP_NUM_THREADS "
          f"{ZMLX_THREADS['n'] or 'inherited'}, env {json.dumps(runtime_env())}", flush=True)
    if v == "bf16":
        results["env"]["zmlx_thread_probe_s"] = thread_probe(zmlx, model, probe_ids, work, log)
        print(f"[{tag}] thread probe (zmlx logits --chunk 1 of {len(probe_ids)} tokens, seconds by "
              f"OMP_NUM_THREADS): {results['env']['zmlx_thread_probe_s']}", flush=True)

def add_run_limit_args(ap) -> None:
    ap.add_argument("--zmlx-threads", type=int, default=-1,
                    help="OMP_NUM_THREADS of the zmlx commands: -1 = min(4, CPUs) (default), 0 = inherit")
    ap.add_argument("--zmlx-slow", type=float, default=RUN_LIMITS["slow"],
                    help="report (with a thread snapshot) a zmlx command still running after this many seconds")
    ap.add_argument("--zmlx-timeout", type=float, default=RUN_LIMITS["timeout"],
                    help="kill a zmlx command still running after this many seconds (the oracle then fails "
                         "with the command and its threads' state; 0 = no limit)")


def progress(tag: str, v: str, i: int, n: int, t1: float, t0: float, log: list) -> None:
    """One line per prompt during the zmlx runs: a log cut off by a time limit shows how far it came."""
    last = [e.get("s", 0.0) for e in log[-3:]]
    print(f"[{tag}] {v}: zmlx prompt {i + 1}/{n} done in {time.time() - t1:.2f}s (one pass / chunked / chunk 1: "
          f"{' / '.join(f'{x:.2f}' for x in last)}; {time.time() - t0:.1f}s total)", flush=True)


def zmlx_logits(zmlx: str, model: str, ids: list, out_npy: str, chunk: int, log: list, backend="cpu",
                threads: int | None = None, timeout: float | None = None):
    cmd = [zmlx, "logits", model, "--ids", ",".join(str(i) for i in ids), "--out", out_npy,
           "--backend", backend]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    run(cmd, log, threads=threads, timeout=timeout)
    a = np.load(out_npy)
    assert a.shape == (len(ids), a.shape[1]) and a.dtype == np.float32, (a.shape, a.dtype)
    return a


def check_loads(zmlx: str, model: str, ids: list, work: str, log: list) -> dict:
    """Does the converted directory load in zmlx as written? If not and the cause is the experts count
    key, add num_experts to config.json so the numeric checks can still run (and say so)."""
    res = {"dir": model, "loads_as_written": True, "patched_config": None, "error": None}
    p = run([zmlx, "logits", model, "--ids", ",".join(str(i) for i in ids[:4]), "--out",
             os.path.join(work, "load_probe.npy"), "--backend", "cpu"], log, check=False)
    if p.returncode == 0:
        return res
    res["loads_as_written"] = False
    res["error"] = (p.stderr or p.stdout).strip()[-1000:]
    cpath = os.path.join(model, "config.json")
    cfg = json.load(open(cpath))
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
        json.dump(cfg, open(cpath, "w"), indent=4)
        res["patched_config"] = "added num_experts = num_local_experts"
        run([zmlx, "logits", model, "--ids", ",".join(str(i) for i in ids[:4]), "--out",
             os.path.join(work, "load_probe.npy"), "--backend", "cpu"], log)
    else:
        raise RuntimeError(f"zmlx cannot load {model}: {res['error']}")
    return res


MUTATIONS = ("rope_theta_1e4", "swap_experts_0_1_layer_1", "q_norm_ones_layer_0")


def mutated_copy(src: str, dst: str, kind: str, edit_tensors) -> None:
    """A copy of a converted directory with one deliberate defect, to show an oracle would see it.
    "rope_theta_1e4" edits config.json; any other kind is applied by edit_tensors(kind, raw), called
    once per safetensors file with raw = {name: (dtype, array)} and returning whether it changed raw."""
    shutil.copytree(src, dst)
    if kind == "rope_theta_1e4":
        cpath = os.path.join(dst, "config.json")
        c = json.load(open(cpath))
        c["rope_theta"] = 1e4
        if isinstance(c.get("rope_parameters"), dict):
            c["rope_parameters"]["rope_theta"] = 1e4
        json.dump(c, open(cpath, "w"), indent=4)
        return
    hit = False
    for f in safetensors_files(dst):
        raw = st_read(f)
        if edit_tensors(kind, raw):
            st_write(f, raw, {"format": "mlx"})
            hit = True
    assert hit, f"mutation {kind}: no tensor found"


def set_ones(raw: dict, name: str) -> bool:
    """Sets a (bf16) norm weight to 1, if this file has it."""
    if name not in raw:
        return False
    dt, a = raw[name]
    raw[name] = (dt, f32_to_bf16_bits(np.ones(a.shape, np.float32)))
    return True


def swap_experts_0_1(raw: dict, prefix: str) -> bool:
    """Swaps experts 0 and 1 of every stacked tensor whose name starts with prefix (a name fragment
    ending in "." also matches anywhere: ".feed_forward.switch_mlp." hits every layer)."""
    changed = False
    for name in [n for n in raw if n.startswith(prefix) or (prefix.startswith(".") and prefix in n)]:
        dt, a = raw[name]
        a = a.copy()
        a[[0, 1]] = a[[1, 0]]
        raw[name], changed = (dt, a), True
    return changed


def swap_gate_up(raw: dict, prefix: str) -> bool:
    """gate_proj <-> up_proj under prefix (weight, scales, biases): silu(up) * gate, the mlx-lm bug of
    2026-01 (spec 0.3)."""
    changed = False
    for suf in ("weight", "scales", "biases"):
        g, u = prefix + "gate_proj." + suf, prefix + "up_proj." + suf
        if g in raw and u in raw:
            raw[g], raw[u] = raw[u], raw[g]
            changed = True
    return changed


def _qwen3_moe_edit(kind: str, raw: dict) -> bool:
    if kind == "swap_experts_0_1_layer_1":
        return swap_experts_0_1(raw, "model.layers.1.mlp.switch_mlp.")
    if kind == "q_norm_ones_layer_0":
        return set_ones(raw, "model.layers.0.self_attn.q_norm.weight")
    raise ValueError(kind)


def mutate_dir(src: str, dst: str, kind: str) -> None:
    mutated_copy(src, dst, kind, _qwen3_moe_edit)


# ----------------------------------------------------------------------------------------------
# model configuration


def model_config(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
                decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, hidden_act="silu",
                initializer_range=args.init_std)


# The output head of the four oracles' random models (docs/conformance.md, "The output head of the test
# models"). With plain Gaussian rows the logits at a position are i.i.d. Gaussian over the vocabulary, and at
# 10-18 % of positions the top two are within 2 bf16 steps of each other, where any change of rounding order
# (transformers bf16 against its own fp32 too) flips the argmax. The rows of the head (the untied lm_head, or the
# embedding where the head is tied to it) therefore get norms with a heavy upper tail: a random half of the
# rows keeps the base norm, the other half is scaled by exp(spread * z), z > 0 half-normal. The top logit then
# usually comes from a row well above the rest (near-ties 3-5 %), and no row is smaller than before, so a tied
# embedding never leaves a token's residual stream to the random layers alone (scaled down, they make the
# network chaotic: with two-sided log-normal norms bf16 noise reached 1.4e-2 on the LFM2 model).
HEAD_ROW_SPREAD = 1.0


def head_row_scale(rows: int, spread: float, seed: int) -> np.ndarray:
    """[rows, 1] factors exp(spread * max(z, 0)), z ~ N(0, 1) from a generator of their own (seeded from the
    model seed, so every other weight keeps the value it has without them)."""
    z = np.random.default_rng([int(seed), 0x4EAD]).standard_normal((rows, 1))
    return np.exp(spread * np.maximum(z, 0.0))


def scale_head_rows(v, spread: float, seed: int):
    """v (NumPy array or torch tensor, [V, D]) with its rows scaled by head_row_scale."""
    if not spread:
        return v
    f = head_row_scale(int(v.shape[0]), spread, seed)
    if isinstance(v, np.ndarray):
        return v * f
    import torch
    return v * torch.from_numpy(f).to(v.dtype)


def add_head_arg(ap) -> None:
    ap.add_argument("--head-row-spread", type=float, default=HEAD_ROW_SPREAD,
                    help="spread of the output head's row norms (untied lm_head, or the tied embedding): half "
                         "the rows scaled by exp(spread * |z|); 0 = plain Gaussian rows (the init before "
                         "2026-11-26 12:00)")


def init_value(name: str, shape: tuple, rng_normal, args):
    """Weights of the random model: norms 1 + jitter (so a '1 + w' or an ignored norm weight shows), the
    embedding N(0, embed_std), lm_head N(0, lm_head_std) (logits not flat: std ~ lm_head_std * sqrt(hidden)),
    every other matrix N(0, init_std). A larger init_std makes the random network chaotic: bf16 rounding
    alone then moves the logits by several percent (measured with the NumPy forward: init_std 0.1 -> 2-3%
    bf16-vs-float64), which would drown any real difference."""
    if len(shape) == 1:
        return 1.0 + args.norm_jitter * rng_normal(shape)
    if "embed_tokens" in name:
        return args.embed_std * rng_normal(shape)
    if "lm_head" in name:  # rows with heavy-tailed norms (HEAD_ROW_SPREAD)
        return scale_head_rows(args.lm_head_std * rng_normal(shape), args.head_row_spread, args.seed)
    return args.init_std * rng_normal(shape)


# ----------------------------------------------------------------------------------------------
# the Hugging Face side


class HF:
    def __init__(self, args, work: str, results: dict):
        import torch
        import transformers
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        self.torch, self.tf = torch, transformers
        self.Config, self.Model = Qwen3MoeConfig, Qwen3MoeForCausalLM
        self.args, self.work, self.results = args, work, results
        self.device = "cuda" if torch.cuda.is_available() and not args.hf_cpu else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.suppress(Exception):
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        env = results["env"]
        env["torch"] = torch.__version__
        env["transformers"] = transformers.__version__
        env["hf_device"] = self.device
        if self.device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)
        env["hf_settings"] = {"allow_tf32": False, "allow_bf16_reduced_precision_reduction": False,
                              "attn_implementation": "eager", "experts_implementation": args.hf_experts}

    def build_and_save(self, hf_dir: str) -> tuple:
        torch, args = self.torch, self.args
        kw = model_config(args)
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
        try:
            cfg = self.Config(**kw, rope_parameters=rope)
        except TypeError:
            cfg = self.Config(**kw, rope_theta=args.rope_theta)
        with contextlib.suppress(Exception):
            cfg._attn_implementation = "eager"
        torch.manual_seed(args.seed)
        model = self.Model(cfg)
        with contextlib.suppress(Exception):
            model.set_attn_implementation("eager")
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                v = init_value(name, tuple(p.shape), lambda s: torch.randn(s, generator=gen), args)
                p.copy_(v.to(p.dtype))
        model = model.to(torch.bfloat16).eval()
        model.save_pretrained(hf_dir)
        sd = model.state_dict()
        orig = {k: v.float().cpu().numpy() for k, v in sd.items()}
        shapes = {k: list(v.shape) for k, v in sd.items()}
        saved = {}
        for f in safetensors_files(hf_dir):
            for k, v in st_header(f).items():
                if k != "__metadata__":
                    saved[k] = (v["dtype"], v["shape"])
        saved_cfg = json.load(open(os.path.join(hf_dir, "config.json")))
        self.results["hf_checkpoint"] = {
            "files": sorted(os.listdir(hf_dir)), "config": saved_cfg, "saved_tensors": len(saved),
            "saved_dtypes": sorted({d for d, _ in saved.values()}),
            "saved_expert_keys_sample": sorted(k for k in saved if ".experts." in k)[:4],
            "in_memory_state_dict_keys": len(shapes),
            "in_memory_expert_keys": {k: s for k, s in shapes.items() if ".experts." in k and ".layers.0." in k
                                      and not _PER_EXPERT.match(k)} or "per-expert modules",
            "experts_implementation": str(getattr(model.config, "_experts_implementation", None)),
            "attn_implementation": str(getattr(model.config, "_attn_implementation", None)),
        }
        del model
        return orig, shapes

    def load(self, hf_dir: str, dtype):
        torch = self.torch
        m = hf_from_pretrained(self.Model, hf_dir, dtype, self.device)
        notes = []
        if self.args.hf_experts != "default":
            try:
                if hasattr(m, "set_experts_implementation"):
                    m.set_experts_implementation(self.args.hf_experts)
                else:
                    m.config._experts_implementation = self.args.hf_experts
            except Exception as e:  # noqa: BLE001
                notes.append(f"could not set experts implementation: {type(e).__name__}: {e}")
        eff = sorted({str(getattr(getattr(mod, "config", None), "_experts_implementation", None))
                      for mod in m.modules() if type(mod).__name__.endswith("Experts")})
        self.results["env"]["hf_experts_implementation_effective"] = eff
        # RoPE frequencies must stay float32 (a model-wide .to(bf16) would round them); make sure.
        for mod in m.modules():
            if hasattr(mod, "inv_freq") and isinstance(mod.inv_freq, torch.Tensor):
                if mod.inv_freq.dtype != torch.float32:
                    notes.append(f"{type(mod).__name__}.inv_freq was {mod.inv_freq.dtype}; recomputed in fp32")
                    inv, _ = mod.rope_init_fn(mod.config, self.device)
                    mod.inv_freq = inv.float().to(self.device)
                    mod.original_inv_freq = mod.inv_freq
                hd = self.args.head_dim
                expect = 1.0 / (self.args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
                if tuple(mod.inv_freq.shape) != tuple(expect.shape):
                    notes.append(f"{type(mod).__name__}.inv_freq has shape {tuple(mod.inv_freq.shape)}")
                    continue
                err = float((mod.inv_freq.double().cpu() - expect).abs().max())
                if err > 1e-6:
                    notes.append(f"MISMATCH: {type(mod).__name__}.inv_freq differs from rope_theta "
                                 f"{self.args.rope_theta} by {err}")
        return m, notes

    def logits(self, model, weights: dict, dtype, prompts: list, router_bf16=False) -> tuple:
        torch = self.torch
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in weights.items()}
        model.load_state_dict(sd, strict=True)
        calls = {"n": 0}
        F = torch.nn.functional
        orig_softmax = F.softmax
        E = self.args.experts

        def softmax_bf16_router(x, *a, **kw):
            y = orig_softmax(x, *a, **kw)
            if x.dim() == 2 and x.shape[-1] == E and y.dtype == torch.float32:
                calls["n"] += 1
                return y.to(torch.bfloat16).float()
            return y

        outs = []
        with torch.no_grad():
            if router_bf16:
                F.softmax = softmax_bf16_router
            try:
                for ids in prompts:
                    t = torch.tensor([ids], dtype=torch.long, device=self.device)
                    out = model(input_ids=t, use_cache=False).logits
                    outs.append(out[0].float().cpu().numpy())
            finally:
                F.softmax = orig_softmax
        return outs, calls["n"]


# ----------------------------------------------------------------------------------------------
# self-test checkpoint (NumPy only, Hugging Face per-expert layout, as transformers 5.17 saves it)


def write_numpy_checkpoint(args, hf_dir: str) -> tuple:
    os.makedirs(hf_dir, exist_ok=True)
    kw = model_config(args)
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "dtype": "bfloat16",
           "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"}, **kw}
    cfg["num_local_experts"] = cfg.pop("num_experts")  # what transformers 5.17's save_pretrained writes
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"), indent=2)
    rng = np.random.default_rng(args.seed)
    D, I, E, V = args.hidden, args.moe_inter, args.experts, args.vocab
    H, Hkv, hd = args.heads, args.kv_heads, args.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    for l in range(args.layers):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hkv * hd, D),
                       p + "self_attn.v_proj.weight": (Hkv * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                       p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "mlp.gate.weight": (E, D)})
        for e in range(E):
            shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (I, D),
                           p + f"mlp.experts.{e}.up_proj.weight": (I, D),
                           p + f"mlp.experts.{e}.down_proj.weight": (D, I)})
    tensors, orig = {}, {}
    for name in sorted(shapes):
        v = init_value(name, shapes[name], lambda s: rng.standard_normal(s), args).astype(np.float32)
        bits = f32_to_bf16_bits(v)
        tensors[name] = ("BF16", bits)
        orig[name] = bf16_bits_to_f32(bits)
    st_write(os.path.join(hf_dir, "model.safetensors"), tensors, {"format": "pt"})
    return orig, {k: list(v) for k, v in shapes.items()}


# ----------------------------------------------------------------------------------------------


def fmt_row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zmlx", default="build/zmlx", help="zmlx binary")
    ap.add_argument("--out", required=True, help="folder for results.json and logits.npz")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--selftest", action="store_true", help="no torch: NumPy checkpoint, NumPy reference")
    ap.add_argument("--hf-cpu", action="store_true", help="run transformers on the CPU even with a GPU")
    ap.add_argument("--hf-experts", default="eager",
                    help="transformers experts implementation: eager (the Python loop in modeling_qwen3_moe), "
                         "grouped_mm, batched_mm, or default (leave transformers' choice)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the attention/router/expert matrices")
    ap.add_argument("--embed-std", type=float, default=0.3)
    ap.add_argument("--lm-head-std", type=float, default=0.1)
    add_head_arg(ap)
    ap.add_argument("--norm-jitter", type=float, default=0.1)
    ap.add_argument("--rel-l2-bar", type=float, default=1e-2)
    ap.add_argument("--argmax-bar", type=float, default=0.99)
    add_run_limit_args(ap)
    args = ap.parse_args()
    set_run_limits(args.zmlx_slow, args.zmlx_timeout, args.zmlx_threads)
    if args.chunk < 2:
        ap.error("--chunk must be >= 2 (chunks of 1 token are always run, as the decode path)")

    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="zmlx_oracle_")
    os.makedirs(work, exist_ok=True)
    zmlx = os.path.abspath(args.zmlx)
    log: list = []
    cpu = ""
    with contextlib.suppress(Exception):
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "selftest" if args.selftest else "transformers",
        "env": {"python": platform.python_version(), "numpy": np.__version__, "cpu": cpu,
                "cpus": os.cpu_count(), "zmlx": ""},
        "model_config": model_config(args) | {"rope_theta": args.rope_theta, "embed_std": args.embed_std,
                                              "lm_head_std": args.lm_head_std,
                                              "head_row_spread": args.head_row_spread,
                                              "norm_jitter": args.norm_jitter, "seed": args.seed},
        "bars": {"rel_l2_max_per_prompt": args.rel_l2_bar, "argmax_agree_min_over_all_positions":
                 args.argmax_bar, "chunked_equals_one_pass": "exact"},
        "checks": {}, "comparisons": {}, "commands": log,
    }
    failures, t_start = [], time.time()
    npz, main_refs = {}, {}
    try:
        results["env"]["zmlx"] = run([zmlx, "--version"], log).stdout.strip()
        results["env"]["zmlx_omp_threads"] = ZMLX_THREADS["n"] or "inherited"
        import hashlib
        results["env"]["zmlx_sha256"] = hashlib.sha256(open(zmlx, "rb").read()).hexdigest()
        hf_dir = os.path.join(work, "hf")
        hf = None
        results["env"]["runtime_start"] = runtime_env()
        print(f"[oracle] start: {json.dumps(results['env']['runtime_start'])}", flush=True)
        if args.selftest:
            orig, hf_shapes = write_numpy_checkpoint(args, hf_dir)
        else:
            hf = HF(args, work, results)
            orig, hf_shapes = hf.build_and_save(hf_dir)
            results["env"]["runtime_after_torch"] = runtime_env()
        print(f"[oracle] checkpoint written to {hf_dir} ({len(hf_shapes)} tensors in memory)", flush=True)

        dirs = {"bf16": os.path.join(work, "mlx_bf16"), "q4": os.path.join(work, "mlx_q4")}
        run([zmlx, "convert", hf_dir, dirs["bf16"], "--dtype", "bf16"], log)
        run([zmlx, "convert", hf_dir, dirs["q4"], "--bits", "4", "--group-size", "64"], log)

        rng = np.random.default_rng(args.seed + 1)
        prompts = [rng.integers(0, args.vocab, size=args.seq).tolist() for _ in range(args.prompts)]
        results["prompts"] = prompts

        loads = {v: check_loads(zmlx, d, prompts[0], work, log) for v, d in dirs.items()}
        results["checks"]["loads_as_written"] = loads
        for v, r in loads.items():
            if not r["loads_as_written"]:
                failures.append(f"{v}: the converted directory does not load in zmlx as written "
                                f"({r['error'][:160]}); numeric checks ran after: {r['patched_config']}")

        mlx_cfg = json.load(open(os.path.join(dirs["q4"], "config.json")))
        weights = {}
        for v, d in dirs.items():
            mlx, qinfo = load_mlx(d)
            hfw, notes = mlx_to_hf(mlx, hf_shapes)
            weights[v] = (mlx, hfw)
            chk = {"mapping_notes": notes, "quantized_tensors": len(qinfo)}
            if v == "bf16":
                diff = [k for k in orig if not np.array_equal(orig[k], hfw[k])]
                chk["tensors_not_bit_exact"] = diff[:10]
                chk["n_not_bit_exact"] = len(diff)
                if diff:
                    failures.append(f"bf16 conversion changed {len(diff)} weights, e.g. {diff[:3]}")
            else:
                rel = {k: float(np.linalg.norm(hfw[k] - orig[k]) / max(np.linalg.norm(orig[k]), 1e-30))
                       for k in orig}
                worst = max(rel, key=rel.get)
                chk["dequant_rel_err_max"] = {"tensor": worst, "rel": rel[worst]}
                chk["dequant_rel_err_median_quantized"] = float(np.median(
                    [r for k, r in rel.items() if len(hf_shapes[k]) > 1]))
                chk["unquantized_exact"] = all(np.array_equal(hfw[k], orig[k]) for k in orig
                                               if len(hf_shapes[k]) == 1)
                if rel[worst] > 0.25 or not chk["unquantized_exact"]:
                    failures.append(f"4-bit dequantized weights do not match the originals "
                                    f"(worst {worst}: rel {rel[worst]:.3f}): layout or packing is off")
            results["checks"][f"weights_{v}"] = chk
        print(f"[oracle] weights checked ({time.time() - t_start:.1f}s)", flush=True)

        for v, d in dirs.items():
            mlx, hfw = weights[v]
            refs = {}
            refs["np_f64"] = [np_forward(mlx, mlx_cfg, ids) for ids in prompts]
            refs["np_bf16"] = [np_forward(mlx, mlx_cfg, ids, bf16=True) for ids in prompts]
            if v == "bf16":
                results["checks"]["layers_zeroed_rel_l2_prompt0"] = layers_zeroed_rel_l2(
                    lambda W, ids: np_forward(W, mlx_cfg, ids), mlx, prompts[0], refs["np_f64"][0])
            if hf is not None:
                m16, n16 = hf.load(hf_dir, hf.torch.bfloat16)
                refs["hf_bf16"], _ = hf.logits(m16, hfw, hf.torch.bfloat16, prompts)
                refs["hf_bf16_router_bf16"], ncalls = hf.logits(m16, hfw, hf.torch.bfloat16, prompts,
                                                                router_bf16=True)
                results["checks"][f"router_bf16_patch_calls_{v}"] = ncalls
                if ncalls == 0:
                    del refs["hf_bf16_router_bf16"]
                del m16
                m32, n32 = hf.load(hf_dir, hf.torch.float32)
                refs["hf_fp32"], _ = hf.logits(m32, hfw, hf.torch.float32, prompts)
                del m32
                results["checks"][f"hf_load_notes_{v}"] = n16 + n32
                for note in n16 + n32:
                    if note.startswith("MISMATCH"):
                        failures.append(f"transformers model: {note}")
            main_ref = "hf_bf16" if hf is not None else "np_bf16"
            announce_zmlx_runs("oracle", v, time.time() - t_start, zmlx, d, prompts[0], work, log, results)
            z = {"one_pass": [], f"chunk{args.chunk}": [], "chunk1": []}
            for i, ids in enumerate(prompts):
                t1 = time.time()
                z["one_pass"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}.npy"), 0, log))
                z[f"chunk{args.chunk}"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c.npy"),
                                                           args.chunk, log))
                z["chunk1"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c1.npy"), 1, log))
                progress("oracle", v, i, len(prompts), t1, t_start, log)
            comp = {"reference": main_ref, "per_prompt": [], "aggregate": {}, "argmax_mismatches": []}
            for i in range(len(prompts)):
                row = {"prompt": i}
                row["zmlx_vs_" + main_ref] = compare(z["one_pass"][i], refs[main_ref][i])
                for rk, rv in refs.items():
                    if rk != main_ref:
                        row["zmlx_vs_" + rk] = compare(z["one_pass"][i], rv[i])
                if "hf_fp32" in refs:
                    row["hf_bf16_vs_hf_fp32"] = compare(refs["hf_bf16"][i], refs["hf_fp32"][i])
                    row["np_f64_vs_hf_fp32"] = compare(refs["np_f64"][i], refs["hf_fp32"][i])
                if "hf_bf16_router_bf16" in refs:
                    row["hf_bf16_router_bf16_vs_hf_bf16"] = compare(refs["hf_bf16_router_bf16"][i],
                                                                    refs["hf_bf16"][i])
                zc = z[f"chunk{args.chunk}"][i]
                row[f"chunk{args.chunk}_equals_one_pass"] = bool(np.array_equal(zc, z["one_pass"][i]))
                row[f"chunk{args.chunk}_max_abs_vs_one_pass"] = float(np.abs(zc - z["one_pass"][i]).max())
                row["chunk1_equals_one_pass"] = bool(np.array_equal(z["chunk1"][i], z["one_pass"][i]))
                row["chunk1_max_abs_vs_one_pass"] = float(np.abs(z["chunk1"][i] - z["one_pass"][i]).max())
                row["zmlx_chunk1_vs_" + main_ref] = compare(z["chunk1"][i], refs[main_ref][i])
                comp["per_prompt"].append(row)
                comp["argmax_mismatches"] += mismatch_details(
                    z["one_pass"][i], refs[main_ref][i],
                    {k: r[i] for k, r in refs.items() if k != main_ref}, i)
            comp["aggregate"]["zmlx_vs_" + main_ref] = aggregate(z["one_pass"], refs[main_ref])
            for rk, rv in refs.items():
                if rk != main_ref:
                    comp["aggregate"]["zmlx_vs_" + rk] = aggregate(z["one_pass"], rv)
            if "hf_fp32" in refs:
                comp["aggregate"]["hf_bf16_vs_hf_fp32"] = aggregate(refs["hf_bf16"], refs["hf_fp32"])
                comp["aggregate"]["np_f64_vs_hf_fp32"] = aggregate(refs["np_f64"], refs["hf_fp32"])
            if "hf_bf16_router_bf16" in refs:
                comp["aggregate"]["hf_bf16_router_bf16_vs_hf_bf16"] = aggregate(refs["hf_bf16_router_bf16"],
                                                                                refs["hf_bf16"])
            comp["aggregate"]["zmlx_chunk1_vs_" + main_ref] = aggregate(z["chunk1"], refs[main_ref])
            comp["aggregate"]["np_bf16_vs_np_f64"] = aggregate(refs["np_bf16"], refs["np_f64"])
            comp["argmax_tie_stats_vs_" + main_ref] = tie_stats(z["one_pass"], refs[main_ref])
            if "hf_fp32" in refs:
                comp["argmax_tie_stats_hf_bf16_vs_hf_fp32"] = tie_stats(refs["hf_bf16"], refs["hf_fp32"])
            results["comparisons"][v] = comp
            for k, arrs in list(refs.items()) + [("zmlx", z["one_pass"])]:
                npz[f"{v}_{k}"] = np.stack(arrs[:4]).astype(np.float32)  # first 4 prompts: stays < 16 MB

            # bars
            key = "zmlx_vs_" + main_ref
            for row in comp["per_prompt"]:
                if not row[key]["rel_l2"] <= args.rel_l2_bar:
                    failures.append(f"{v} prompt {row['prompt']}: rel L2 {row[key]['rel_l2']:.3e} > "
                                    f"{args.rel_l2_bar:g} (zmlx vs {main_ref})")
                if not row[f"chunk{args.chunk}_equals_one_pass"]:
                    failures.append(f"{v} prompt {row['prompt']}: --chunk {args.chunk} differs from one pass "
                                    f"(max abs {row[f'chunk{args.chunk}_max_abs_vs_one_pass']:.3e})")
            agg = comp["aggregate"][key]
            if not agg["argmax_agree"] >= args.argmax_bar:
                failures.append(f"{v}: argmax agreement {agg['argmax_agree'] * 100:.2f}% < "
                                f"{args.argmax_bar * 100:g}% over {agg['positions']} positions (vs {main_ref})")
            print(f"[oracle] {v} done ({time.time() - t_start:.1f}s)", flush=True)
            main_refs[v] = refs[main_ref]

        # Sensitivity: the same comparison against deliberately broken copies of the bf16 conversion.
        sens = {}
        for kind in MUTATIONS:
            try:
                mdir = os.path.join(work, "mut_" + kind)
                mutate_dir(dirs["bf16"], mdir, kind)
                zm = zmlx_logits(zmlx, mdir, prompts[0], os.path.join(work, f"mut_{kind}.npy"), 0, log)
                c = compare(zm, main_refs["bf16"][0])
                c["detected"] = bool(c["rel_l2"] > args.rel_l2_bar or c["argmax_agree"] < args.argmax_bar)
                sens[kind] = c
                if not c["detected"]:
                    failures.append(f"oracle sensitivity: deliberate defect '{kind}' NOT detected "
                                    f"(rel L2 {c['rel_l2']:.2e}, argmax {c['argmax_agree'] * 100:.1f}%)")
                print(f"[oracle] sensitivity {kind}: rel L2 {c['rel_l2']:.3e} ({time.time() - t_start:.1f}s)",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                sens[kind] = {"error": f"{type(e).__name__}: {e}"}
                failures.append(f"oracle sensitivity: mutation '{kind}' could not run: {e}")
        results["sensitivity_bf16_prompt0"] = sens
    except Exception as e:  # noqa: BLE001
        failures.append(f"error: {type(e).__name__}: {e}")
        results["traceback"] = traceback.format_exc()
        print(results["traceback"], file=sys.stderr)

    results["failures"] = failures
    results["passed"] = not failures
    results["seconds"] = round(time.time() - t_start, 1)
    results["zmlx_seconds"] = zmlx_time_summary(log)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if npz:
        np.savez_compressed(os.path.join(args.out, "logits.npz"), **npz)
    print_table(results, args)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


def print_table(results: dict, args) -> None:
    env = results["env"]
    print()
    print(f"zmlx oracle ({results['mode']}): zmlx {env.get('zmlx')}, transformers {env.get('transformers', '-')},"
          f" torch {env.get('torch', '-')}, GPU {env.get('gpu', '-')}, CPU {env.get('cpu')}")
    for v, comp in results.get("comparisons", {}).items():
        ref = comp["reference"]
        print(f"\n== {v}: zmlx (CPU, one pass) vs {ref}")
        hdr = ["prompt", "rel L2", "argmax %", "max |d|", f"chunk{args.chunk}==", "chunk1==", "c1 rel L2"]
        extra = [k for k in comp["per_prompt"][0] if k.startswith("zmlx_vs_") and k != "zmlx_vs_" + ref]
        extra += [k for k in ("hf_bf16_vs_hf_fp32", "hf_bf16_router_bf16_vs_hf_bf16") if k in comp["per_prompt"][0]]
        hdr += [f"{k} relL2/argmax%" for k in extra]
        w = [max(8, len(h)) for h in hdr]
        print(fmt_row(hdr, w))
        rows = comp["per_prompt"] + [None]
        for row in rows:
            if row is None:
                a = comp["aggregate"]
                m = a["zmlx_vs_" + ref]
                cols = ["all", f"{m['rel_l2']:.3e}", f"{m['argmax_agree'] * 100:.2f}", f"{m['max_abs']:.3e}", "", "",
                        f"{a['zmlx_chunk1_vs_' + ref]['rel_l2']:.3e}"]
                cols += [f"{a[k]['rel_l2']:.2e}/{a[k]['argmax_agree'] * 100:.1f}" for k in extra]
            else:
                m = row["zmlx_vs_" + ref]
                cols = [row["prompt"], f"{m['rel_l2']:.3e}", f"{m['argmax_agree'] * 100:.2f}", f"{m['max_abs']:.3e}",
                        "yes" if row[f"chunk{args.chunk}_equals_one_pass"] else
                        f"no {row[f'chunk{args.chunk}_max_abs_vs_one_pass']:.1e}",
                        "yes" if row["chunk1_equals_one_pass"] else f"no {row['chunk1_max_abs_vs_one_pass']:.1e}",
                        f"{row['zmlx_chunk1_vs_' + ref]['rel_l2']:.3e}"]
                cols += [f"{row[k]['rel_l2']:.2e}/{row[k]['argmax_agree'] * 100:.1f}" for k in extra]
            print(fmt_row(cols, w))
        for mm in comp["argmax_mismatches"][:10]:
            print("   argmax mismatch:", json.dumps(mm))
        for k in comp:
            if k.startswith("argmax_tie_stats"):
                print(f"   {k}: {json.dumps(comp[k])}")
    print()
    for k, c in results.get("sensitivity_bf16_prompt0", {}).items():
        if "error" in c:
            print(f"sensitivity {k}: error {c['error']}")
        else:
            print(f"sensitivity (deliberately broken bf16 copy, prompt 0) {k}: rel L2 {c['rel_l2']:.3e}, "
                  f"argmax {c['argmax_agree'] * 100:.1f}% -> {'detected' if c['detected'] else 'NOT detected'}")
    for k, c in results.get("checks", {}).items():
        if k.startswith("weights_") or k.startswith("loads") or k.startswith("layers_"):
            print(f"check {k}: {json.dumps(c)[:400]}")
    if results["failures"]:
        print("\nFAIL:")
        for f in results["failures"]:
            print("  -", f)
    else:
        print("\nPASS: every bar met")
    print(f"zmlx time by command: {json.dumps(results.get('zmlx_seconds'))}")
    print(f"({results['seconds']}s; results in {os.path.join(args.out, 'results.json')})")


if __name__ == "__main__":
    sys.exit(main())
