"""Shared driver of the per-family oracles (oracle_lfm2.py, oracle_dense.py): zmlx (CPU) against Hugging Face
transformers on a small random model, in the style of oracle.py / oracle_glm.py (whose helpers it imports).

A family module provides a `Family` object (see the class below); `main(family)` then:
  1. writes a small random checkpoint in the transformers layout: by transformers itself (default) or by
     NumPy (--selftest, no torch);
  2. converts it with `zmlx convert` twice (--dtype bf16; --bits 4 --group-size 64). If zmlx convert rejects
     the checkpoint, that is a failure, and the numeric checks still run on a conversion written by this
     tool's NumPy converter (mlx-lm semantics) so that the model code is checked anyway;
     --numpy-convert uses that converter on purpose (recorded; not a failure);
  3. reads the MLX files back (4-bit dequantized as bf16(fp32(scale*q + bias)), the weights zmlx actually
     uses), maps them onto the transformers model's own state_dict names, and checks that the bf16 conversion
     reproduces every original weight bit for bit;
  4. runs every prompt (teacher forced) through
       - hf_bf16_mlx : transformers bf16, eager attention / experts, configured to match MLX where the two
                       differ by design (the family lists and counts its adjustments)  -> THE reference;
       - hf_bf16_as_is: transformers bf16 as shipped (only for families with adjustments);
       - hf_fp32_mlx : transformers fp32, same weights and adjustments (the noise floor of bf16);
       - np_f64 / np_bf16: a NumPy forward with MLX semantics, without / with bf16 rounding at MLX's points;
       - zmlx logits --backend cpu: one pass, --chunk C (C = --chunk, several prefill chunks, KV/conv cache),
         --chunk 1 (decode after the first token, every step through the cache);
     plus one long prompt (--long-seq tokens, default 320 > the zmlx KV cache's first allocation of 256 rows)
     run in one pass, in chunks of --long-chunk (128: 128 + 128 + 64) and in chunks of 1;
  5. runs the same comparison against deliberately broken copies of the bf16 conversion (each must be
     detected, i.e. exceed the rel-L2 bar or drop below the argmax bar, or the oracle itself is too weak);
  6. writes results.json, logits.npz and summary.txt under --out, prints a table and a compact summary
     (one line per conversion) and exits 1 if any bar fails.

Bars (both conversions; zmlx one pass vs the reference):
  - relative L2 ||z - r|| / ||r|| over all [T, V] logits <= --rel-l2-bar (1e-2) for EVERY prompt (long one too);
  - argmax agreement >= --argmax-bar (99%) over all positions of the --prompts prompts together;
  - --chunk C bit-identical to one pass (every prompt; the long prompt with --long-chunk);
  - --chunk 1 (decode after prefill, through the cache) within rel L2 --rel-l2-bar of one pass, every prompt
    (bit-exactness is reported; on zmlx's CPU backend it is expected);
  - the bf16 conversion reproduces every weight bit for bit; the converted directories load as written;
  - every deliberate defect is detected.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (ZMLX_THREADS, add_run_limit_args, aggregate, bf16_bits_to_f32, bf16_round,  # noqa: E402
                    compare, f32_to_bf16_bits, hf_from_pretrained, layers_zeroed_rel_l2, load_mlx, mismatch_details,
                    progress, run, runtime_env, safetensors_files, saved_dtypes, set_run_limits, st_read, st_write,
                    announce_zmlx_runs, tie_stats, zmlx_logits, zmlx_time_summary)


# ----------------------------------------------------------------------------------------------
# MLX affine quantization (NumPy; the CPU algorithm of mlx/backend/cpu/quantized.cpp, spec 0.2)


def mlx_quantize(w: np.ndarray, bits: int, gs: int) -> tuple:
    """w: float32 (bf16 values) [..., C] -> (U32 packed [..., C*bits/32], scales bf16 bits, biases bf16 bits)."""
    n_bins = float((1 << bits) - 1)
    shp = w.shape
    g = w.astype(np.float32).reshape(-1, gs)
    w_max, w_min = g.max(axis=1), g.min(axis=1)
    scale = np.maximum((w_max - w_min) / np.float32(n_bins), np.float32(1e-7)).astype(np.float32)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = np.rint(edge / scale).astype(np.float32)
    nz = q0 != 0
    scale = np.where(nz, edge / np.where(nz, q0, 1), scale).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((g - bias[:, None]) / scale[:, None]), 0, n_bins).astype(np.uint32)
    per = 32 // bits
    q = q.reshape(-1, per)
    word = np.zeros(q.shape[0], dtype=np.uint32)
    for i in range(per):
        word |= q[:, i] << np.uint32(bits * i)
    packed = word.reshape(*shp[:-1], shp[-1] // per)
    gshape = (*shp[:-1], shp[-1] // gs)
    return packed, f32_to_bf16_bits(scale).reshape(gshape), f32_to_bf16_bits(bias).reshape(gshape)


def numpy_convert(mlx_names: dict, src_dir: str, out_dir: str, quantize: bool, bits=4, gs=64,
                  overrides: dict | None = None) -> None:
    """An mlx-lm-equivalent conversion without zmlx: mlx_names(name, shape, dtype) -> (mlx name or None, role)
    is the family's sanitize (role 'linear' is quantized along the last axis, 'keep' stays bf16, 'f32' stays
    F32); overrides: {module: {"bits", "group_size"}}."""
    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    raw = {}
    for f in safetensors_files(src_dir):
        raw.update(st_read(f))
    out = {}
    overrides = overrides or {}
    for name, (dt, arr) in sorted(raw.items()):
        v = bf16_bits_to_f32(arr) if dt == "BF16" else arr.astype(np.float32)
        new, role = mlx_names(name, v.shape, cfg)
        if new is None:
            continue
        if role == "f32":
            out[new] = ("F32", v.astype(np.float32))
            continue
        v = bf16_round(v)
        mod = new[: -len(".weight")]
        b = overrides.get(mod, {}).get("bits", bits)
        g = overrides.get(mod, {}).get("group_size", gs)
        if quantize and role == "linear" and v.shape[-1] % g == 0:
            wq, s, bb = mlx_quantize(v, b, g)
            out[new] = ("U32", wq)
            out[mod + ".scales"] = ("BF16", s)
            out[mod + ".biases"] = ("BF16", bb)
        else:
            out[new] = ("BF16", f32_to_bf16_bits(v))
    os.makedirs(out_dir, exist_ok=True)
    st_write(os.path.join(out_dir, "model.safetensors"), out, {"format": "mlx"})
    if quantize:
        q = {"group_size": gs, "bits": bits, **overrides}
        cfg["quantization"] = q
        cfg["quantization_config"] = q
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)


# ----------------------------------------------------------------------------------------------
# a family


class Family:
    """What a family module fills in (see oracle_lfm2.py / oracle_dense.py)."""
    name = ""                     # e.g. "lfm2_moe"
    tag = "oracle"                # log prefix
    hf_model_class = ""           # e.g. "Lfm2MoeForCausalLM"
    hf_config_class = ""          # e.g. "Lfm2MoeConfig"
    has_alignment = False         # True: hf_bf16_as_is is run too
    mutations: tuple = ()
    defaults: dict = {}

    def add_args(self, ap): ...
    def hf_config_kwargs(self, a) -> dict: ...
    def init_value(self, name: str, shape: tuple, normal, a): ...
    def extra_buffers(self) -> tuple: return ()       # buffer-name suffixes that get random values too
    def fp32_buffers(self) -> tuple: return ()        # buffer-name suffixes kept fp32 when saving
    def write_numpy_checkpoint(self, a, hf_dir: str) -> tuple: ...   # -> (orig, in-memory shapes)
    def mlx_to_hf(self, mlx: dict, hf_shapes: dict, cfg: dict) -> tuple: ...  # -> (weights, notes)
    def np_forward(self, W: dict, cfg: dict, ids: list, bf16: bool) -> np.ndarray: ...
    def align(self, hf, model, dtype, mlx_aligned: bool) -> dict: return {}   # after loading weights
    def mutate(self, src: str, dst: str, kind: str) -> None: ...
    def numpy_names(self, name: str, shape: tuple, cfg: dict) -> tuple: ...
    def numpy_overrides(self, cfg: dict) -> dict: return {}


# ----------------------------------------------------------------------------------------------
# transformers side (generic)


class HF:
    def __init__(self, fam: Family, a, results: dict):
        import torch
        import transformers
        self.torch, self.tf, self.fam, self.a, self.results = torch, transformers, fam, a, results
        self.Config = getattr(transformers, fam.hf_config_class)
        self.Model = getattr(transformers, fam.hf_model_class)
        self.device = "cuda" if torch.cuda.is_available() and not a.hf_cpu else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.suppress(Exception):
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        env = results["env"]
        env.update(torch=torch.__version__, transformers=transformers.__version__, hf_device=self.device,
                   hf_settings={"allow_tf32": False, "allow_bf16_reduced_precision_reduction": False,
                                "attn_implementation": "eager", "experts_implementation": "eager"})
        if self.device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)

    def build_and_save(self, hf_dir: str) -> tuple:
        torch, a, fam = self.torch, self.a, self.fam
        cfg = self.Config(**fam.hf_config_kwargs(a))
        torch.manual_seed(a.seed)
        model = self.Model(cfg)
        gen = torch.Generator().manual_seed(a.seed)
        extra = fam.extra_buffers()
        with torch.no_grad():
            named = sorted(list(model.named_parameters()) +
                           [(n, b) for n, b in model.named_buffers() if extra and n.endswith(extra)])
            for name, p in named:
                v = fam.init_value(name, tuple(p.shape), lambda s: torch.randn(s, generator=gen, dtype=torch.float64), a)
                p.copy_(torch.as_tensor(v).to(p.dtype))
        model = model.to(torch.bfloat16).eval()
        keep = fam.fp32_buffers()
        if keep:
            for mname, mod in model.named_modules():
                for bname, buf in list(mod.named_buffers(recurse=False)):
                    if bname.endswith(keep):
                        mod._buffers[bname] = buf.float()
        model.save_pretrained(hf_dir)
        sd = model.state_dict()
        orig = {k: v.float().cpu().numpy() for k, v in sd.items()}
        shapes = {k: list(v.shape) for k, v in sd.items()}
        saved = saved_dtypes(hf_dir)
        self.results["hf_checkpoint"] = {
            "files": sorted(os.listdir(hf_dir)), "config": json.load(open(os.path.join(hf_dir, "config.json"))),
            "saved_tensors": len(saved), "saved_dtypes": sorted(set(saved.values())),
            "saved_keys_layer2": sorted(k for k in saved if ".layers.2." in k)[:40],
            "saved_fp32": sorted(k for k, d in saved.items() if d == "F32")[:8],
            "in_memory_keys_layer2": {k: s for k, s in shapes.items() if ".layers.2." in k}}
        del model
        return orig, shapes

    def load(self, hf_dir: str, dtype):
        m = hf_from_pretrained(self.Model, hf_dir, dtype, self.device)
        with contextlib.suppress(Exception):
            if hasattr(m, "set_experts_implementation"):
                m.set_experts_implementation("eager")
        return m

    def logits(self, hf_dir: str, weights: dict, dtype, prompts: list, mlx_aligned: bool) -> tuple:
        """Loads the model, puts `weights` in (state_dict names), applies the family's MLX alignment, runs."""
        torch = self.torch
        model = self.load(hf_dir, dtype)
        sd_now = model.state_dict()
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)).to(sd_now[k].dtype) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        info = {"missing": list(missing)[:8], "unexpected": list(unexpected)[:8]}
        if missing or unexpected:
            raise RuntimeError(f"transformers state_dict does not match the mapped weights: {info}")
        info.update(self.fam.align(self, model, dtype, mlx_aligned) or {})
        # RoPE frequencies stay fp32 (checked; a model-wide cast would round them)
        for mod in model.modules():
            inv = getattr(mod, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.dtype != torch.float32:
                info.setdefault("notes", []).append(f"{type(mod).__name__}.inv_freq was {inv.dtype}")
        outs = []
        with torch.no_grad():
            for ids in prompts:
                t = torch.tensor([ids], dtype=torch.long, device=self.device)
                outs.append(model(input_ids=t, use_cache=False).logits[0].float().cpu().numpy())
        info.update(self.fam.after_run(self, model) if hasattr(self.fam, "after_run") else {})
        del model
        return outs, info


# ----------------------------------------------------------------------------------------------


def common_args(ap, d: dict):
    ap.add_argument("--zmlx", default="build/zmlx", help="zmlx binary")
    ap.add_argument("--out", required=True, help="folder for results.json, logits.npz, summary.txt")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--selftest", action="store_true", help="no torch: NumPy checkpoint, NumPy MLX-semantics reference")
    ap.add_argument("--hf-cpu", action="store_true", help="run transformers on the CPU even with a GPU")
    ap.add_argument("--numpy-convert", action="store_true",
                    help="convert with this tool's NumPy (mlx-lm semantics) converter instead of zmlx convert")
    ap.add_argument("--seed", type=int, default=d.get("seed", 2024))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--long-seq", type=int, default=320, help="tokens of the long prompt (0: none)")
    ap.add_argument("--long-chunk", type=int, default=128)
    ap.add_argument("--rel-l2-bar", type=float, default=1e-2)
    ap.add_argument("--argmax-bar", type=float, default=0.99)
    add_run_limit_args(ap)


def main(fam: Family) -> int:
    ap = argparse.ArgumentParser(description=sys.modules[type(fam).__module__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, fam.defaults)
    fam.add_args(ap)
    a = ap.parse_args()
    set_run_limits(a.zmlx_slow, a.zmlx_timeout, a.zmlx_threads)
    if a.chunk < 2 or a.long_chunk < 2:
        ap.error("--chunk / --long-chunk must be >= 2 (chunks of 1 token are always run, as the decode path)")

    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix=f"zmlx_{fam.tag}_")
    os.makedirs(work, exist_ok=True)
    zmlx = os.path.abspath(a.zmlx)
    log: list = []
    cpu = ""
    with contextlib.suppress(Exception):
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "family": fam.name, "mode": "selftest" if a.selftest else "transformers",
               "env": {"python": platform.python_version(), "numpy": np.__version__, "cpu": cpu,
                       "cpus": os.cpu_count()},
               "args": vars(a),
               "bars": {"rel_l2_max_per_prompt": a.rel_l2_bar, "argmax_min_over_all_positions": a.argmax_bar,
                        "chunked_equals_one_pass": "exact", "chunk1_rel_l2_vs_one_pass_max": a.rel_l2_bar,
                        "mutations": "each detected"},
               "checks": {}, "comparisons": {}, "commands": log}
    failures, t0, npz = [], time.time(), {}
    summary_lines = []
    try:
        results["env"]["zmlx"] = run([zmlx, "--version"], log).stdout.strip()
        results["env"]["zmlx_omp_threads"] = ZMLX_THREADS["n"] or "inherited"
        results["env"]["zmlx_sha256"] = hashlib.sha256(open(zmlx, "rb").read()).hexdigest()
        hf_dir = os.path.join(work, "hf")
        hf = None
        results["env"]["runtime_start"] = runtime_env()
        print(f"[{fam.tag}] start: {json.dumps(results['env']['runtime_start'])}", flush=True)
        if a.selftest:
            orig, hf_shapes = fam.write_numpy_checkpoint(a, hf_dir)
        else:
            hf = HF(fam, a, results)
            orig, hf_shapes = hf.build_and_save(hf_dir)
            results["env"]["runtime_after_torch"] = runtime_env()
        print(f"[{fam.tag}] checkpoint written ({len(hf_shapes)} tensors in the transformers model, "
              f"{time.time() - t0:.1f}s)", flush=True)

        dirs = {"bf16": os.path.join(work, "mlx_bf16"), "q4": os.path.join(work, "mlx_q4")}
        conv = {}
        for v, d in dirs.items():
            how = "numpy (--numpy-convert)" if a.numpy_convert else "zmlx convert"
            if not a.numpy_convert:
                cmd = [zmlx, "convert", hf_dir, d] + (["--dtype", "bf16"] if v == "bf16" else
                                                      ["--bits", "4", "--group-size", "64"])
                p = run(cmd, log, check=False)
                if p.returncode != 0:
                    err = (p.stderr or p.stdout).strip()[-600:]
                    failures.append(f"{v}: `zmlx convert` rejects the transformers checkpoint: {err[-300:]}; "
                                    f"numeric checks ran on the NumPy (mlx-lm semantics) conversion")
                    how = "numpy (fallback: zmlx convert failed)"
                    shutil.rmtree(d, ignore_errors=True)
            if how.startswith("numpy"):
                cfg = json.load(open(os.path.join(hf_dir, "config.json")))
                numpy_convert(fam.numpy_names, hf_dir, d, v == "q4", overrides=fam.numpy_overrides(cfg) if v == "q4"
                              else None)
            conv[v] = how
        results["checks"]["conversion"] = conv

        rng = np.random.default_rng(a.seed + 1)
        V = hf_shapes.get("model.embed_tokens.weight", [0])[0]
        prompts = [rng.integers(0, V, size=a.seq).tolist() for _ in range(a.prompts)]
        long_prompt = rng.integers(0, V, size=a.long_seq).tolist() if a.long_seq > 0 else None
        allp = prompts + ([long_prompt] if long_prompt else [])
        results["prompts"] = prompts
        results["long_prompt"] = long_prompt

        # loads as written?
        loads = {}
        for v, d in dirs.items():
            p = run([zmlx, "logits", d, "--ids", ",".join(map(str, prompts[0][:4])), "--out",
                     os.path.join(work, "probe.npy"), "--backend", "cpu"], log, check=False)
            loads[v] = {"ok": p.returncode == 0, "error": None if p.returncode == 0 else (p.stderr or p.stdout)[-800:]}
            if p.returncode != 0:
                raise RuntimeError(f"zmlx cannot load the {v} conversion: {loads[v]['error']}")
        results["checks"]["loads_as_written"] = loads

        mlx_cfg = json.load(open(os.path.join(dirs["q4"], "config.json")))
        results["checks"]["mlx_config_quantization"] = mlx_cfg.get("quantization")
        main_bf16 = None
        for v, d in dirs.items():
            mlx, qinfo = load_mlx(d)
            hfw, notes = fam.mlx_to_hf(mlx, hf_shapes, mlx_cfg)
            chk = {"mapping_notes": notes, "quantized_tensors": len(qinfo),
                   "quantized_bits": sorted({f"{k}: {i['bits']}" for k, i in qinfo.items()
                                             if i["bits"] != 4})[:64]}
            if v == "bf16":
                diff = [k for k in orig if not np.array_equal(orig[k], hfw[k])]
                chk["n_not_bit_exact"], chk["not_bit_exact"] = len(diff), diff[:10]
                if diff:
                    failures.append(f"bf16 conversion changed {len(diff)} weights, e.g. {diff[:3]}")
            else:
                rel = {k: float(np.linalg.norm(hfw[k] - orig[k]) / max(np.linalg.norm(orig[k]), 1e-30)) for k in orig}
                worst = max(rel, key=rel.get)
                chk["dequant_rel_err_max"] = {"tensor": worst, "rel": rel[worst]}
                chk["dequant_rel_err_median_2d"] = float(np.median([r for k, r in rel.items() if len(hf_shapes[k]) > 1]))
                chk["unquantized_1d_exact"] = all(np.array_equal(hfw[k], orig[k]) for k in orig if len(hf_shapes[k]) == 1)
                if rel[worst] > 0.25 or not chk["unquantized_1d_exact"]:
                    failures.append(f"4-bit dequantized weights do not match the originals (worst {worst}: "
                                    f"rel {rel[worst]:.3f}): layout or packing is off")
            results["checks"][f"weights_{v}"] = chk

            refs = {"np_f64": [fam.np_forward(mlx, mlx_cfg, ids, False) for ids in allp],
                    "np_bf16": [fam.np_forward(mlx, mlx_cfg, ids, True) for ids in allp]}
            if v == "bf16":
                results["checks"]["layers_zeroed_rel_l2_prompt0"] = layers_zeroed_rel_l2(
                    lambda W, ids: fam.np_forward(W, mlx_cfg, ids, False), mlx, prompts[0], refs["np_f64"][0])
            print(f"[{fam.tag}] {v}: NumPy references done ({time.time() - t0:.1f}s)", flush=True)
            if hf is not None:
                tb = hf.torch.bfloat16
                refs["hf_bf16_mlx"], i1 = hf.logits(hf_dir, hfw, tb, allp, mlx_aligned=True)
                print(f"[{fam.tag}] {v}: hf_bf16_mlx done ({time.time() - t0:.1f}s)", flush=True)
                if fam.has_alignment:
                    refs["hf_bf16_as_is"], i2 = hf.logits(hf_dir, hfw, tb, allp, mlx_aligned=False)
                    print(f"[{fam.tag}] {v}: hf_bf16_as_is done ({time.time() - t0:.1f}s)", flush=True)
                else:
                    i2 = None
                refs["hf_fp32_mlx"], i3 = hf.logits(hf_dir, hfw, hf.torch.float32, allp, mlx_aligned=True)
                results["checks"][f"hf_{v}"] = {"bf16_mlx": i1, "bf16_as_is": i2, "fp32_mlx": i3}
                for note in (i1.get("failures") or []):
                    failures.append(f"{v}: transformers alignment: {note}")
            main = "hf_bf16_mlx" if hf is not None else "np_bf16"
            announce_zmlx_runs(fam.tag, v, time.time() - t0, zmlx, d, allp[-1], work, log, results)

            z = {"one": [], "chunk": [], "chunk1": []}
            for i, ids in enumerate(allp):
                t1 = time.time()
                c = a.long_chunk if long_prompt is not None and i == len(prompts) else a.chunk
                z["one"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}.npy"), 0, log))
                z["chunk"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c.npy"), c, log))
                z["chunk1"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c1.npy"), 1, log))
                progress(fam.tag, v, i, len(allp), t1, t0, log)
            n = len(prompts)
            comp = {"reference": main, "per_prompt": [], "aggregate": {}, "long_prompt": None, "argmax_mismatches": []}
            for i in range(len(allp)):
                row = {"prompt": i if i < n else "long", "tokens": len(allp[i])}
                for rk, rv in refs.items():
                    row["zmlx_vs_" + rk] = compare(z["one"][i], rv[i])
                if "hf_bf16_as_is" in refs:
                    row["hf_bf16_as_is_vs_hf_bf16_mlx"] = compare(refs["hf_bf16_as_is"][i], refs[main][i])
                if "hf_fp32_mlx" in refs:
                    row["hf_bf16_mlx_vs_hf_fp32_mlx"] = compare(refs[main][i], refs["hf_fp32_mlx"][i])
                row["chunk_size"] = a.long_chunk if i == n else a.chunk
                row["chunk_equals_one_pass"] = bool(np.array_equal(z["chunk"][i], z["one"][i]))
                row["chunk_max_abs_vs_one_pass"] = float(np.abs(z["chunk"][i] - z["one"][i]).max())
                row["chunk1_equals_one_pass"] = bool(np.array_equal(z["chunk1"][i], z["one"][i]))
                row["chunk1_vs_one_pass"] = compare(z["chunk1"][i], z["one"][i])
                row["zmlx_chunk1_vs_" + main] = compare(z["chunk1"][i], refs[main][i])
                m = row["zmlx_vs_" + main]
                tagp = f"prompt {row['prompt']}"
                if not m["rel_l2"] <= a.rel_l2_bar:
                    failures.append(f"{v} {tagp}: rel L2 {m['rel_l2']:.3e} > {a.rel_l2_bar:g} (zmlx vs {main})")
                if not row["chunk_equals_one_pass"]:
                    failures.append(f"{v} {tagp}: --chunk {row['chunk_size']} differs from one pass (max abs "
                                    f"{row['chunk_max_abs_vs_one_pass']:.3e})")
                if not row["chunk1_vs_one_pass"]["rel_l2"] <= a.rel_l2_bar:
                    failures.append(f"{v} {tagp}: --chunk 1 (decode through the cache) rel L2 "
                                    f"{row['chunk1_vs_one_pass']['rel_l2']:.3e} vs one pass")
                if i < n:
                    comp["per_prompt"].append(row)
                    comp["argmax_mismatches"] += mismatch_details(z["one"][i], refs[main][i],
                                                                  {k: r[i] for k, r in refs.items() if k != main}, i)
                else:
                    comp["long_prompt"] = row
            for rk, rv in refs.items():
                comp["aggregate"]["zmlx_vs_" + rk] = aggregate(z["one"][:n], rv[:n])
            comp["aggregate"]["zmlx_chunk1_vs_" + main] = aggregate(z["chunk1"][:n], refs[main][:n])
            comp["aggregate"]["np_bf16_vs_np_f64"] = aggregate(refs["np_bf16"][:n], refs["np_f64"][:n])
            if "hf_fp32_mlx" in refs:
                comp["aggregate"]["hf_bf16_mlx_vs_hf_fp32_mlx"] = aggregate(refs[main][:n], refs["hf_fp32_mlx"][:n])
                comp["aggregate"]["np_f64_vs_hf_fp32_mlx"] = aggregate(refs["np_f64"][:n], refs["hf_fp32_mlx"][:n])
            if "hf_bf16_as_is" in refs:
                comp["aggregate"]["hf_bf16_as_is_vs_hf_bf16_mlx"] = aggregate(refs["hf_bf16_as_is"][:n], refs[main][:n])
            comp["argmax_tie_stats_vs_" + main] = tie_stats(z["one"][:n], refs[main][:n])
            # a tied head can make the logits peak at the input token itself (trivial argmax): on record
            comp["reference_argmax_is_input_token"] = float(np.mean(np.concatenate(
                [refs[main][i].argmax(-1) == np.asarray(prompts[i]) for i in range(n)])))
            agg = comp["aggregate"]["zmlx_vs_" + main]
            if not agg["argmax_agree"] >= a.argmax_bar:
                failures.append(f"{v}: argmax agreement {agg['argmax_agree'] * 100:.2f}% < {a.argmax_bar * 100:g}% "
                                f"over {agg['positions']} positions (vs {main})")
            results["comparisons"][v] = comp
            for k, arrs in list(refs.items()) + [("zmlx", z["one"])]:
                npz[f"{v}_{k}"] = np.stack(arrs[:min(4, n)]).astype(np.float32)
            if long_prompt is not None:
                npz[f"{v}_long_{main}"] = refs[main][n].astype(np.float32)
                npz[f"{v}_long_zmlx"] = z["one"][n].astype(np.float32)
            if v == "bf16":
                main_bf16 = refs[main]
            lp = comp["long_prompt"]
            line = (f"{fam.name} {v:<4}: zmlx vs {main}: rel L2 {agg['rel_l2']:.3e} (max/prompt "
                    f"{max(r['zmlx_vs_' + main]['rel_l2'] for r in comp['per_prompt']):.3e}), argmax "
                    f"{agg['argmax_agree'] * 100:.2f}% of {agg['positions']}; chunk{a.chunk}==1pass "
                    f"{sum(r['chunk_equals_one_pass'] for r in comp['per_prompt'])}/{n}, chunk1 "
                    f"{'exact' if all(r['chunk1_equals_one_pass'] for r in comp['per_prompt']) else 'max rel L2 %.1e' % max(r['chunk1_vs_one_pass']['rel_l2'] for r in comp['per_prompt'])}")
            if lp:
                line += (f"; long {lp['tokens']} tok: rel L2 {lp['zmlx_vs_' + main]['rel_l2']:.3e}, argmax "
                         f"{lp['zmlx_vs_' + main]['argmax_agree'] * 100:.1f}%, chunk{a.long_chunk} "
                         f"{'exact' if lp['chunk_equals_one_pass'] else 'DIFFERS'}, chunk1 "
                         f"{'exact' if lp['chunk1_equals_one_pass'] else 'rel L2 %.1e' % lp['chunk1_vs_one_pass']['rel_l2']}")
            summary_lines.append(line)
            print(f"[{fam.tag}] {line} ({time.time() - t0:.1f}s)", flush=True)

        sens = {}
        for kind in fam.mutations:
            try:
                mdir = os.path.join(work, "mut_" + kind)
                fam.mutate(dirs["bf16"], mdir, kind)
                zm = zmlx_logits(zmlx, mdir, prompts[0], os.path.join(work, f"mut_{kind}.npy"), 0, log)
                c = compare(zm, main_bf16[0])
                c["detected"] = bool(c["rel_l2"] > a.rel_l2_bar or c["argmax_agree"] < a.argmax_bar)
                sens[kind] = c
                print(f"[{fam.tag}] sensitivity {kind}: rel L2 {c['rel_l2']:.3e} ({time.time() - t0:.1f}s)", flush=True)
                if not c["detected"]:
                    failures.append(f"oracle sensitivity: deliberate defect '{kind}' NOT detected "
                                    f"(rel L2 {c['rel_l2']:.2e}, argmax {c['argmax_agree'] * 100:.1f}%)")
            except Exception as e:  # noqa: BLE001
                sens[kind] = {"error": f"{type(e).__name__}: {e}"}
                failures.append(f"oracle sensitivity: mutation '{kind}' could not run: {e}")
        results["sensitivity_bf16_prompt0"] = sens
    except Exception as e:  # noqa: BLE001
        failures.append(f"error: {type(e).__name__}: {e}")
        results["traceback"] = traceback.format_exc()
        print(results["traceback"], file=sys.stderr)

    results["failures"], results["passed"] = failures, not failures
    results["seconds"] = round(time.time() - t0, 1)
    results["zmlx_seconds"] = zmlx_time_summary(log)
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    if npz:
        np.savez_compressed(os.path.join(a.out, "logits.npz"), **npz)
    text = report(results, a, summary_lines)
    print(text)
    with open(os.path.join(a.out, "summary.txt"), "w") as fh:
        fh.write(text + "\n")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


def report(results: dict, a, summary_lines: list) -> str:
    env = results["env"]
    out = [f"\n{results['family']} oracle ({results['mode']}): zmlx {env.get('zmlx')} "
           f"sha256 {env.get('zmlx_sha256', '')[:12]}, transformers {env.get('transformers', '-')}, "
           f"torch {env.get('torch', '-')}, GPU {env.get('gpu', '-')}, conversion {results['checks'].get('conversion')}"]
    for v, comp in results.get("comparisons", {}).items():
        ref = comp["reference"]
        out.append(f"== {v}: zmlx (CPU) vs {ref}; per prompt rel L2 / argmax% / chunk==1pass / chunk1 rel L2 vs 1pass")
        cells = []
        for r in comp["per_prompt"] + ([comp["long_prompt"]] if comp["long_prompt"] else []):
            m = r["zmlx_vs_" + ref]
            cells.append(f"{r['prompt']}: {m['rel_l2']:.2e}/{m['argmax_agree'] * 100:.0f}/"
                         f"{'y' if r['chunk_equals_one_pass'] else 'N'}/"
                         f"{'=' if r['chunk1_equals_one_pass'] else '%.0e' % r['chunk1_vs_one_pass']['rel_l2']}")
        for i in range(0, len(cells), 6):
            out.append("   " + "  ".join(cells[i:i + 6]))
        for k, m in comp["aggregate"].items():
            out.append(f"   {k:<36} rel L2 {m['rel_l2']:.3e}  argmax {m['argmax_agree'] * 100:6.2f}%")
        out.append(f"   reference argmax == input token at {comp['reference_argmax_is_input_token'] * 100:.1f}% of positions")
        for k in comp:
            if k.startswith("argmax_tie_stats"):
                out.append(f"   {k}: {json.dumps(comp[k])}")
        for mm in comp["argmax_mismatches"][:6]:
            out.append(f"   argmax mismatch: {json.dumps(mm)}")
    for k, c in results.get("sensitivity_bf16_prompt0", {}).items():
        out.append(f"sensitivity {k}: " + (c["error"] if "error" in c else
                                          f"rel L2 {c['rel_l2']:.3e}, argmax {c['argmax_agree'] * 100:.1f}% -> "
                                          f"{'detected' if c['detected'] else 'NOT detected'}"))
    if "layers_zeroed_rel_l2_prompt0" in results["checks"]:
        out.append(f"layers (out_proj / down_proj zeroed) move the float64 logits of prompt 0 by rel L2 "
                   f"{results['checks']['layers_zeroed_rel_l2_prompt0']:.3f}")
    for k in ("weights_bf16", "weights_q4", "hf_bf16", "hf_q4"):
        if k in results["checks"]:
            out.append(f"check {k}: {json.dumps(results['checks'][k])[:600]}")
    out.append("")
    out += summary_lines
    if results["failures"]:
        out.append("FAIL:")
        out += [f"  - {f}" for f in results["failures"]]
    else:
        out.append("PASS: every bar met")
    out.append(f"zmlx time by command: {json.dumps(results.get('zmlx_seconds'))}")
    out.append(f"({results['seconds']}s; results in {os.path.join(a.out, 'results.json')})")
    return "\n".join(out)
