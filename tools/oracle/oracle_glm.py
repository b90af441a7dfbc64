#!/usr/bin/env python3
"""External-truth check for glm4_moe_lite (GLM-4.7-Flash): zmlx (CPU) against transformers'
Glm4MoeLiteForCausalLM on a small random model. Companion of oracle.py (same helpers, same bars).

Steps (needs torch + transformers >= 5 with Glm4MoeLite; a GPU if there is one):
  1. builds a small random Glm4MoeLiteForCausalLM (MLA with q_lora, layer 0 dense, the rest MoE with a
     shared expert, sigmoid router with a random e_score_correction_bias, routed_scaling_factor 1.8),
     casts it to bf16 (the bias stays fp32, as the real checkpoint) and save_pretrained()s it;
  2. converts it with `zmlx convert` twice: --dtype bf16 and --bits 4 --group-size 64 (this exercises
     kv_b_proj -> embed_q / unembed_out and the expert stacking);
  3. reads the MLX files back, rebuilds kv_b_proj from embed_q / unembed_out and the transformers expert
     layout from switch_mlp, and checks the bf16 conversion reproduces every original weight bit for bit;
  4. runs random prompts (teacher forced) through
       - hf_bf16_mlx : transformers bf16, configured to match MLX where they differ by design (below)
                       -> THE reference,
       - hf_bf16_as_is: transformers bf16 exactly as shipped (reported, to size the design differences),
       - hf_fp32_mlx : transformers fp32 with the same weights and alignments (noise floor of bf16),
       - np_f64 / np_bf16: a NumPy MLA forward with MLX semantics (independent cross-check),
       - zmlx on the CPU: one pass (expanded MLA), --chunk 16 (KV cache, expanded), --chunk 1 (the
         absorbed decode form over the latent cache);
  5. writes results.json (+ logits.npz), prints a table, exits 1 if a bar fails.

Where transformers and MLX differ by design (spec/architectures.md §2.2), zmlx follows MLX, so the
reference transformers model is adjusted in memory (nothing in its files changes):
  - q_a_layernorm / kv_a_layernorm eps: transformers builds them with the RMSNorm default 1e-6; mlx-lm
    uses rms_norm_eps (1e-5). -> variance_epsilon = config.rms_norm_eps on those modules.
  - router logits: transformers computes x @ Wᵀ in fp32 and takes the sigmoid of that; mlx-lm computes
    the bf16 matmul (fp32 accumulation, bf16 result) and takes the fp32 sigmoid of the rounded value.
    -> the router's fp32 F.linear call (input fp32, weight [n_routed_experts, hidden]) is wrapped to round
    its result to bf16. The number of wrapped calls is recorded (0 would mean the patch missed).
Differences left alone (inside the tolerance, listed in docs/conformance.md): transformers rounds each
expert's weighted output to bf16 and accumulates the experts in bf16 (index_add_), MLX sums fp32 products
and rounds once; eager attention rounds the softmax probabilities to bf16 before P @ V; HF masks
non-selected expert groups with -inf, MLX with 0 (no effect with n_group = 1, the real config).

Bars (both conversions, zmlx one pass vs hf_bf16_mlx): relative L2 of all logits <= 1e-2 per prompt,
argmax agreement >= 99% over all positions, --chunk 16 == one pass exactly, and the absorbed decode path
(--chunk 1) within relative L2 1e-2 of one pass.

--selftest: no torch needed; the checkpoint is written by NumPy in the transformers layout (kv_b_proj,
per-expert experts, F32 correction bias, plus an MTP layer that convert must drop) and the NumPy forward
with MLX rounding (np_bf16) is the reference.

Usage (GPU machine, after tools/oracle/prepare_bin.sh):
  python3 tools/oracle/oracle_glm.py --zmlx build/zmlx --out /tmp/oracle_glm
  python3 tools/oracle/oracle_glm.py --zmlx build/zmlx --out /tmp/oracle_glm --selftest   # anywhere with NumPy
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
from oracle import (ZMLX_THREADS, add_head_arg, add_run_limit_args, aggregate, bf16_round,  # noqa: E402
                    compare, f32_to_bf16_bits, hf_from_pretrained, layers_zeroed_rel_l2, load_mlx, mismatch_details,
                    mlx_to_hf, mutated_copy, progress, run, runtime_env, saved_dtypes, scale_head_rows, set_ones,
                    set_run_limits, st_write, swap_experts_0_1, announce_zmlx_runs, tie_stats, zmlx_logits,
                    zmlx_time_summary)


# ----------------------------------------------------------------------------------------------
# configuration and weights


def hf_config_kwargs(a) -> dict:
    """Only fields Glm4MoeLiteConfig declares (it is a strict dataclass in transformers 5)."""
    return dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                moe_intermediate_size=a.moe_inter, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                num_key_value_heads=a.heads, n_shared_experts=1, n_routed_experts=a.experts,
                routed_scaling_factor=1.8, kv_lora_rank=a.kv_lora, q_lora_rank=a.q_lora,
                qk_rope_head_dim=a.rope_dim, v_head_dim=a.v_dim, qk_nope_head_dim=a.nope_dim, n_group=1,
                topk_group=1, num_experts_per_tok=a.top_k, norm_topk_prob=True, max_position_embeddings=4096,
                initializer_range=a.init_std, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta}, rope_interleave=True,
                mlp_layer_types=["dense"] + ["sparse"] * (a.layers - 1), attention_bias=False)


def init_value(name: str, shape: tuple, normal, a):
    """norms 1 + jitter; embedding N(0, embed_std); lm_head N(0, lm_head_std); the correction bias
    N(0, bias_std) (so that it changes which experts are selected); every other matrix N(0, init_std)."""
    if name.endswith("e_score_correction_bias"):
        return a.bias_std * normal(shape)
    if len(shape) == 1:
        return 1.0 + a.norm_jitter * normal(shape)
    if "embed_tokens" in name:
        return a.embed_std * normal(shape)
    if "lm_head" in name:  # rows with heavy-tailed norms (oracle.HEAD_ROW_SPREAD)
        return scale_head_rows(a.lm_head_std * normal(shape), a.head_row_spread, a.seed)
    if any(k in name for k in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")):
        return a.attn_std * normal(shape)  # peaked attention, so RoPE / MLA defects show
    return a.init_std * normal(shape)


def mlx_to_hf_glm(mlx: dict, hf_shapes: dict, cfg: dict) -> tuple:
    """MLX weights -> the transformers model's tensors: kv_b_proj rebuilt from embed_q / unembed_out
    (row h*(dn+dv) + i = embed_q[h][:, i] for i < dn, unembed_out[h][i - dn] after), experts via oracle.py."""
    H, dn, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    m = dict(mlx)
    for name in [n for n in mlx if n.endswith(".self_attn.embed_q.weight")]:
        pre = name[: -len("embed_q.weight")]
        eq, uo = m.pop(pre + "embed_q.weight"), m.pop(pre + "unembed_out.weight")  # [H, L, dn], [H, dv, L]
        assert eq.shape[0] == H and eq.shape[2] == dn and uo.shape[1] == dv, (eq.shape, uo.shape)
        kvb = np.concatenate([eq.transpose(0, 2, 1), uo], axis=1)  # [H, dn + dv, L]
        m[pre + "kv_b_proj.weight"] = np.ascontiguousarray(kvb.reshape(H * (dn + dv), -1))
    return mlx_to_hf(m, hf_shapes)


# ----------------------------------------------------------------------------------------------
# NumPy forward with MLX semantics (spec §2.2; expanded MLA form, as MLX runs a prompt)


def np_forward_glm(W: dict, cfg: dict, ids: list, bf16: bool = False) -> np.ndarray:
    H, dn, dr, dv = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    L, E, k_top = cfg["kv_lora_rank"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    eps = cfg.get("rms_norm_eps", 1e-5)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    types = cfg.get("mlp_layer_types") or ["dense" if i < cfg.get("first_k_dense_replace", 0) else "sparse"
                                           for i in range(cfg["num_hidden_layers"])]
    scaling, norm_topk = cfg.get("routed_scaling_factor", 1.0), cfg.get("norm_topk_prob", True)
    f = lambda n: W[n].astype(np.float64)  # noqa: E731
    R = (lambda x: bf16_round(np.asarray(x, dtype=np.float32)).astype(np.float64)) if bf16 else (lambda x: x)  # noqa: E731
    T = len(ids)
    inv = 1.0 / (theta ** (np.arange(0, dr, 2, dtype=np.float64) / dr))
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)  # [T, dr/2]

    def rms(x, w):
        return R(w * R(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)))

    def lin(x, w):
        return R(x @ w.T)

    def rope_traditional(x):  # x [T, ..., dr], pairs (2i, 2i+1)
        c = cos.reshape(T, *([1] * (x.ndim - 2)), dr // 2)
        s = sin.reshape(T, *([1] * (x.ndim - 2)), dr // 2)
        o = np.empty_like(x)
        o[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        o[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return R(o)

    def swiglu_mlp(x, pre):
        g, u = lin(x, f(pre + "gate_proj.weight")), lin(x, f(pre + "up_proj.weight"))
        return lin(R(R(g * R(1 / (1 + np.exp(-g)))) * u), f(pre + "down_proj.weight"))

    h = f("model.embed_tokens.weight")[np.asarray(ids)]
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    scale = (dn + dr) ** -0.5
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms(h, f(p + "input_layernorm.weight"))
        if cfg.get("q_lora_rank"):
            q = lin(rms(lin(a, f(p + "self_attn.q_a_proj.weight")), f(p + "self_attn.q_a_layernorm.weight")),
                    f(p + "self_attn.q_b_proj.weight"))
        else:
            q = lin(a, f(p + "self_attn.q_proj.weight"))
        q = q.reshape(T, H, dn + dr)
        q_nope, q_pe = q[..., :dn], rope_traditional(q[..., dn:])
        ckv = lin(a, f(p + "self_attn.kv_a_proj_with_mqa.weight"))
        lat = rms(ckv[:, :L], f(p + "self_attn.kv_a_layernorm.weight"))
        k_pe = rope_traditional(ckv[:, L:])
        k_nope = R(np.einsum("sc,hcd->hsd", lat, f(p + "self_attn.embed_q.weight")))
        v = R(np.einsum("sc,hdc->hsd", lat, f(p + "self_attn.unembed_out.weight")))
        pe = R(np.einsum("thd,sd->hts", R(q_pe * scale), k_pe))
        s = scale * np.einsum("thd,hsd->hts", q_nope, k_nope) + pe
        s[:, mask] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = R(np.einsum("hts,hsd->thd", s, v).reshape(T, H * dv))
        h = R(h + lin(o, f(p + "self_attn.o_proj.weight")))
        a = rms(h, f(p + "post_attention_layernorm.weight"))
        if types[layer] == "dense":
            h = R(h + swiglu_mlp(a, p + "mlp."))
            continue
        z = lin(a, f(p + "mlp.gate.weight"))                 # bf16 logits (MLX)
        sig = 1.0 / (1.0 + np.exp(-z))                         # fp32 sigmoid
        sel = sig + f(p + "mlp.gate.e_score_correction_bias")  # selection only
        top = np.argsort(-sel, axis=-1, kind="stable")[:, :k_top]
        w = np.take_along_axis(sig, top, axis=-1)
        if norm_topk:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * scaling
        y = np.zeros_like(h)
        Wg, Wu, Wd = (f(p + f"mlp.switch_mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
        for e in range(E):
            rows, slot = np.nonzero(top == e)
            if rows.size == 0:
                continue
            x = a[rows]
            g, u = lin(x, Wg[e]), lin(x, Wu[e])
            y[rows] += w[rows, slot][:, None] * lin(R(R(g * R(1 / (1 + np.exp(-g)))) * u), Wd[e])
        h = R(h + R(R(y) + swiglu_mlp(a, p + "mlp.shared_experts.")))
    return lin(rms(h, f("model.norm.weight")), f("lm_head.weight"))


# ----------------------------------------------------------------------------------------------
# transformers


class HF:
    def __init__(self, a, results: dict):
        import torch
        import transformers
        self.torch, self.tf, self.a, self.results = torch, transformers, a, results
        self.Config = getattr(transformers, "Glm4MoeLiteConfig")
        self.Model = getattr(transformers, "Glm4MoeLiteForCausalLM")
        self.device = "cuda" if torch.cuda.is_available() and not a.hf_cpu else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.suppress(Exception):
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        env = results["env"]
        env.update(torch=torch.__version__, transformers=transformers.__version__, hf_device=self.device)
        if self.device == "cuda":
            env["gpu"] = torch.cuda.get_device_name(0)

    def build_and_save(self, hf_dir: str) -> tuple:
        torch, a = self.torch, self.a
        cfg = self.Config(**hf_config_kwargs(a))
        torch.manual_seed(a.seed)
        model = self.Model(cfg)
        gen = torch.Generator().manual_seed(a.seed)
        with torch.no_grad():
            named = sorted(list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                              if n.endswith("e_score_correction_bias")])
            for name, p in named:
                v = init_value(name, tuple(p.shape), lambda s: torch.randn(s, generator=gen, dtype=torch.float64), a)
                p.copy_(v.to(p.dtype))
        model = model.to(torch.bfloat16).eval()
        for mod in model.modules():  # the correction bias stays fp32 (transformers' _keep_in_fp32_modules_strict)
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.data = mod.e_score_correction_bias.data.float()
        model.save_pretrained(hf_dir)
        sd = model.state_dict()
        orig = {k: v.float().cpu().numpy() for k, v in sd.items()}
        shapes = {k: list(v.shape) for k, v in sd.items()}
        saved = saved_dtypes(hf_dir)
        self.results["hf_checkpoint"] = {
            "files": sorted(os.listdir(hf_dir)), "config": json.load(open(os.path.join(hf_dir, "config.json"))),
            "saved_tensors": len(saved), "saved_dtypes": sorted(set(saved.values())),
            "saved_keys_sample": sorted(k for k in saved if ".layers.1." in k)[:40]}
        del model
        return orig, shapes

    def load(self, hf_dir: str, dtype, mlx_aligned: bool):
        torch = self.torch
        m = hf_from_pretrained(self.Model, hf_dir, dtype, self.device)
        with contextlib.suppress(Exception):
            if hasattr(m, "set_experts_implementation"):
                m.set_experts_implementation("eager")
        notes = []
        if mlx_aligned:
            n = 0
            for name, mod in m.named_modules():
                if name.endswith("q_a_layernorm") or name.endswith("kv_a_layernorm"):
                    mod.variance_epsilon = float(m.config.rms_norm_eps)
                    n += 1
            notes.append(f"set variance_epsilon = {m.config.rms_norm_eps} on {n} q_a/kv_a norms")
        for mod in m.modules():  # RoPE frequencies must stay fp32
            if hasattr(mod, "inv_freq") and isinstance(mod.inv_freq, torch.Tensor) and mod.inv_freq.dtype != torch.float32:
                inv, _ = mod.rope_init_fn(mod.config, self.device) if hasattr(mod, "rope_init_fn") else \
                    mod.compute_default_rope_parameters(mod.config, self.device)
                mod.inv_freq = inv.float().to(self.device)
                notes.append("inv_freq recomputed in fp32")
        return m, notes

    def logits(self, model, weights: dict, dtype, prompts: list, router_bf16: bool) -> tuple:
        torch = self.torch
        sd = model.state_dict()
        new = {}
        for k, v in weights.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            new[k] = t.to(torch.float32 if sd[k].dtype == torch.float32 else dtype)
        model.load_state_dict(new, strict=True)
        F = torch.nn.functional
        orig_linear = F.linear
        E, D = self.a.experts, self.a.hidden
        calls = {"n": 0}

        def linear_router_bf16(x, w, b=None):
            y = orig_linear(x, w, b)
            if x.dtype == torch.float32 and w.dim() == 2 and tuple(w.shape) == (E, D) and dtype != torch.float32:
                calls["n"] += 1
                return y.to(torch.bfloat16).float()
            return y

        outs = []
        with torch.no_grad():
            if router_bf16:
                F.linear = linear_router_bf16
            try:
                for ids in prompts:
                    t = torch.tensor([ids], dtype=torch.long, device=self.device)
                    outs.append(model(input_ids=t, use_cache=False).logits[0].float().cpu().numpy())
            finally:
                F.linear = orig_linear
        return outs, calls["n"]


# ----------------------------------------------------------------------------------------------
# self-test checkpoint (NumPy only, the transformers Glm4MoeLite layout + one MTP layer to be dropped)


def write_numpy_checkpoint(a, hf_dir: str) -> tuple:
    os.makedirs(hf_dir, exist_ok=True)
    kw = hf_config_kwargs(a)
    cfg = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "dtype": "bfloat16", **kw}
    json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"), indent=2)
    rng = np.random.default_rng(a.seed)
    D, H, E, I, V = a.hidden, a.heads, a.experts, a.moe_inter, a.vocab
    dn, dr, dv, L, ql = a.nope_dim, a.rope_dim, a.v_dim, a.kv_lora, a.q_lora
    shapes = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    for l in range(a.layers + 1):  # layer a.layers: the multi-token-prediction layer (not in the model)
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_a_proj.weight": (ql, D), p + "self_attn.q_a_layernorm.weight": (ql,),
                       p + "self_attn.q_b_proj.weight": (H * (dn + dr), ql),
                       p + "self_attn.kv_a_proj_with_mqa.weight": (L + dr, D), p + "self_attn.kv_a_layernorm.weight": (L,),
                       p + "self_attn.kv_b_proj.weight": (H * (dn + dv), L), p + "self_attn.o_proj.weight": (D, H * dv)})
        if l == 0:
            shapes.update({p + "mlp.gate_proj.weight": (2 * D, D), p + "mlp.up_proj.weight": (2 * D, D),
                           p + "mlp.down_proj.weight": (D, 2 * D)})
            continue
        shapes.update({p + "mlp.gate.weight": (E, D), p + "mlp.gate.e_score_correction_bias": (E,),
                       p + "mlp.shared_experts.gate_proj.weight": (I, D), p + "mlp.shared_experts.up_proj.weight": (I, D),
                       p + "mlp.shared_experts.down_proj.weight": (D, I)})
        for e in range(E):
            shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (I, D), p + f"mlp.experts.{e}.up_proj.weight": (I, D),
                           p + f"mlp.experts.{e}.down_proj.weight": (D, I)})
    shapes[f"model.layers.{a.layers}.eh_proj.weight"] = (D, 2 * D)
    tensors, orig, in_model = {}, {}, {}
    for name in sorted(shapes):
        v = init_value(name, shapes[name], lambda s: rng.standard_normal(s), a).astype(np.float32)
        if name.endswith("e_score_correction_bias"):
            tensors[name] = ("F32", v)
            val = v
        else:
            bits = f32_to_bf16_bits(v)
            tensors[name] = ("BF16", bits)
            val = bf16_round(v)
        if not name.startswith(f"model.layers.{a.layers}."):
            orig[name] = val
            in_model[name] = list(shapes[name])
    st_write(os.path.join(hf_dir, "model.safetensors"), tensors, {"format": "pt"})
    return orig, in_model


# ----------------------------------------------------------------------------------------------
# deliberate defects (the oracle must see them)

MUTATIONS = ("rope_theta_1e4", "e_score_bias_zero_layer_1", "kv_a_layernorm_ones_layer_0",
             "swap_experts_0_1_layer_1")


def _glm_edit(kind: str, raw: dict) -> bool:
    if kind == "e_score_bias_zero_layer_1":
        name = "model.layers.1.mlp.gate.e_score_correction_bias"
        if name not in raw:
            return False
        dt, arr = raw[name]
        raw[name] = (dt, np.zeros_like(arr))
        return True
    if kind == "kv_a_layernorm_ones_layer_0":
        return set_ones(raw, "model.layers.0.self_attn.kv_a_layernorm.weight")
    if kind == "swap_experts_0_1_layer_1":
        return swap_experts_0_1(raw, "model.layers.1.mlp.switch_mlp.")
    raise ValueError(kind)


def mutate(src: str, dst: str, kind: str) -> None:
    mutated_copy(src, dst, kind, _glm_edit)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zmlx", default="build/zmlx")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work")
    ap.add_argument("--hf-cpu", action="store_true")
    ap.add_argument("--selftest", action="store_true",
                    help="no torch: NumPy checkpoint (transformers layout + an MTP layer), NumPy MLX-semantics reference")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--q-lora", type=int, default=128)
    ap.add_argument("--kv-lora", type=int, default=128)
    ap.add_argument("--nope-dim", type=int, default=64)
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--v-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=128)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--init-std", type=float, default=0.02,
                    help="matrix init; at 0.05 the random network is chaotic: bf16 rounding alone moves the "
                         "logits by ~4.7%% (np_bf16 vs np_f64, selftest), at 0.02 by ~0.5%%")
    ap.add_argument("--attn-std", type=float, default=0.05,
                    help="init of q_a/q_b/kv_a/kv_b (the attention logits' scale)")
    ap.add_argument("--embed-std", type=float, default=0.3)
    ap.add_argument("--lm-head-std", type=float, default=0.1)
    add_head_arg(ap)
    ap.add_argument("--bias-std", type=float, default=0.05)
    ap.add_argument("--norm-jitter", type=float, default=0.1)
    ap.add_argument("--rel-l2-bar", type=float, default=1e-2)
    ap.add_argument("--argmax-bar", type=float, default=0.99)
    add_run_limit_args(ap)
    a = ap.parse_args()
    set_run_limits(a.zmlx_slow, a.zmlx_timeout, a.zmlx_threads)

    os.makedirs(a.out, exist_ok=True)
    work = a.work or tempfile.mkdtemp(prefix="zmlx_oracle_glm_")
    os.makedirs(work, exist_ok=True)
    zmlx = os.path.abspath(a.zmlx)
    log: list = []
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "family": "glm4_moe_lite", "env": {"python": platform.python_version(), "numpy": np.__version__},
               "args": vars(a), "bars": {"rel_l2_max_per_prompt": a.rel_l2_bar, "argmax_min": a.argmax_bar,
                                          "chunked_equals_one_pass": "exact", "chunk1_rel_l2_max": a.rel_l2_bar},
               "checks": {}, "comparisons": {}, "commands": log}
    failures, t0, npz = [], time.time(), {}
    try:
        results["env"]["zmlx"] = run([zmlx, "--version"], log).stdout.strip()
        results["env"]["zmlx_omp_threads"] = ZMLX_THREADS["n"] or "inherited"
        results["env"]["zmlx_sha256"] = hashlib.sha256(open(zmlx, "rb").read()).hexdigest()
        hf_dir = os.path.join(work, "hf")
        results["env"]["runtime_start"] = runtime_env()
        print(f"[oracle_glm] start: {json.dumps(results['env']['runtime_start'])}", flush=True)
        if a.selftest:
            hf = None
            orig, hf_shapes = write_numpy_checkpoint(a, hf_dir)
        else:
            hf = HF(a, results)
            orig, hf_shapes = hf.build_and_save(hf_dir)
            results["env"]["runtime_after_torch"] = runtime_env()
        results["mode"] = "selftest" if a.selftest else "transformers"
        dirs = {"bf16": os.path.join(work, "mlx_bf16"), "q4": os.path.join(work, "mlx_q4")}
        run([zmlx, "convert", hf_dir, dirs["bf16"], "--dtype", "bf16"], log)
        run([zmlx, "convert", hf_dir, dirs["q4"], "--bits", "4", "--group-size", "64"], log)
        rng = np.random.default_rng(a.seed + 1)
        prompts = [rng.integers(0, a.vocab, size=a.seq).tolist() for _ in range(a.prompts)]
        results["prompts"] = prompts
        mlx_cfg = json.load(open(os.path.join(dirs["q4"], "config.json")))

        for v, d in dirs.items():
            mlx, qinfo = load_mlx(d)
            hfw, notes = mlx_to_hf_glm(mlx, hf_shapes, mlx_cfg)
            chk = {"mapping_notes": notes, "quantized_tensors": len(qinfo)}
            if v == "bf16":
                diff = [k for k in orig if not np.array_equal(orig[k], hfw[k])]
                chk["n_not_bit_exact"], chk["not_bit_exact"] = len(diff), diff[:10]
                if diff:
                    failures.append(f"bf16 conversion changed {len(diff)} weights, e.g. {diff[:3]}")
            results["checks"][f"weights_{v}"] = chk

            refs = {"np_f64": [np_forward_glm(mlx, mlx_cfg, ids) for ids in prompts],
                    "np_bf16": [np_forward_glm(mlx, mlx_cfg, ids, bf16=True) for ids in prompts]}
            if v == "bf16":
                results["checks"]["layers_zeroed_rel_l2_prompt0"] = layers_zeroed_rel_l2(
                    lambda W, ids: np_forward_glm(W, mlx_cfg, ids), mlx, prompts[0], refs["np_f64"][0])
            if hf is not None:
                m16, n16 = hf.load(hf_dir, hf.torch.bfloat16, mlx_aligned=True)
                refs["hf_bf16_mlx"], ncalls = hf.logits(m16, hfw, hf.torch.bfloat16, prompts, router_bf16=True)
                results["checks"][f"router_bf16_calls_{v}"] = ncalls
                if ncalls == 0:
                    failures.append("the router-logit rounding patch never fired: the transformers router changed; "
                                    "the reference is not MLX-aligned")
                del m16
                m16, n16b = hf.load(hf_dir, hf.torch.bfloat16, mlx_aligned=False)
                refs["hf_bf16_as_is"], _ = hf.logits(m16, hfw, hf.torch.bfloat16, prompts, router_bf16=False)
                del m16
                m32, n32 = hf.load(hf_dir, hf.torch.float32, mlx_aligned=True)
                refs["hf_fp32_mlx"], _ = hf.logits(m32, hfw, hf.torch.float32, prompts, router_bf16=False)
                del m32
                results["checks"][f"hf_load_notes_{v}"] = n16 + n16b + n32

            announce_zmlx_runs("oracle_glm", v, time.time() - t0, zmlx, d, prompts[0], work, log, results)
            z = {"one_pass": [], "chunk": [], "chunk1": []}
            for i, ids in enumerate(prompts):
                t1 = time.time()
                z["one_pass"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}.npy"), 0, log))
                z["chunk"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c.npy"), a.chunk, log))
                z["chunk1"].append(zmlx_logits(zmlx, d, ids, os.path.join(work, f"z_{v}_{i}_c1.npy"), 1, log))
                progress("oracle_glm", v, i, len(prompts), t1, t0, log)
            main = "hf_bf16_mlx" if hf is not None else "np_bf16"
            comp = {"reference": main, "per_prompt": [], "aggregate": {}, "argmax_mismatches": []}
            for i in range(len(prompts)):
                row = {"prompt": i}
                for rk, rv in refs.items():
                    row["zmlx_vs_" + rk] = compare(z["one_pass"][i], rv[i])
                if hf is not None:
                    row["hf_bf16_as_is_vs_hf_bf16_mlx"] = compare(refs["hf_bf16_as_is"][i], refs[main][i])
                    row["hf_bf16_mlx_vs_hf_fp32_mlx"] = compare(refs[main][i], refs["hf_fp32_mlx"][i])
                row["chunk_equals_one_pass"] = bool(np.array_equal(z["chunk"][i], z["one_pass"][i]))
                row["chunk1_vs_one_pass"] = compare(z["chunk1"][i], z["one_pass"][i])
                row["zmlx_chunk1_vs_" + main] = compare(z["chunk1"][i], refs[main][i])
                comp["per_prompt"].append(row)
                comp["argmax_mismatches"] += mismatch_details(z["one_pass"][i], refs[main][i],
                                                              {k: r[i] for k, r in refs.items() if k != main}, i)
                if not row["zmlx_vs_" + main]["rel_l2"] <= a.rel_l2_bar:
                    failures.append(f"{v} prompt {i}: rel L2 {row['zmlx_vs_' + main]['rel_l2']:.3e} vs {main}")
                if not row["chunk_equals_one_pass"]:
                    failures.append(f"{v} prompt {i}: --chunk {a.chunk} differs from one pass")
                if not row["chunk1_vs_one_pass"]["rel_l2"] <= a.rel_l2_bar:
                    failures.append(f"{v} prompt {i}: absorbed decode (--chunk 1) rel L2 "
                                    f"{row['chunk1_vs_one_pass']['rel_l2']:.3e} vs one pass")
            for rk, rv in refs.items():
                comp["aggregate"]["zmlx_vs_" + rk] = aggregate(z["one_pass"], rv)
            comp["aggregate"]["zmlx_chunk1_vs_" + main] = aggregate(z["chunk1"], refs[main])
            comp["aggregate"]["zmlx_chunk1_vs_one_pass"] = aggregate(z["chunk1"], z["one_pass"])
            comp["aggregate"]["np_bf16_vs_np_f64"] = aggregate(refs["np_bf16"], refs["np_f64"])
            if hf is not None:
                comp["aggregate"]["hf_bf16_as_is_vs_hf_bf16_mlx"] = aggregate(refs["hf_bf16_as_is"], refs[main])
            comp["argmax_tie_stats_vs_" + main] = tie_stats(z["one_pass"], refs[main])
            agg = comp["aggregate"]["zmlx_vs_" + main]
            if not agg["argmax_agree"] >= a.argmax_bar:
                failures.append(f"{v}: argmax agreement {agg['argmax_agree'] * 100:.2f}% < {a.argmax_bar * 100:g}%")
            results["comparisons"][v] = comp
            for k, arrs in list(refs.items()) + [("zmlx", z["one_pass"])]:
                npz[f"{v}_{k}"] = np.stack(arrs[:4]).astype(np.float32)
            print(f"[oracle_glm] {v}: zmlx vs {main}: rel L2 {agg['rel_l2']:.3e}, argmax "
                  f"{agg['argmax_agree'] * 100:.2f}% ({time.time() - t0:.1f}s)", flush=True)
            if v == "bf16":
                main_bf16 = refs[main]

        sens = {}
        for kind in MUTATIONS:
            try:
                mdir = os.path.join(work, "mut_" + kind)
                mutate(dirs["bf16"], mdir, kind)
                zm = zmlx_logits(zmlx, mdir, prompts[0], os.path.join(work, f"mut_{kind}.npy"), 0, log)
                c = compare(zm, main_bf16[0])
                c["detected"] = bool(c["rel_l2"] > a.rel_l2_bar or c["argmax_agree"] < a.argmax_bar)
                sens[kind] = c
                print(f"[oracle_glm] sensitivity {kind}: rel L2 {c['rel_l2']:.3e} ({time.time() - t0:.1f}s)",
                      flush=True)
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
    for v, comp in results["comparisons"].items():
        print(f"\n== {v}")
        for k, m in comp["aggregate"].items():
            print(f"  {k:<40} rel L2 {m['rel_l2']:.3e}  argmax {m['argmax_agree'] * 100:6.2f}%")
        for k in comp:
            if k.startswith("argmax_tie_stats"):
                print(f"  {k}: {json.dumps(comp[k])}")
    for k, c in results.get("sensitivity_bf16_prompt0", {}).items():
        print(f"  sensitivity {k}: " + (c["error"] if "error" in c else
                                        f"rel L2 {c['rel_l2']:.3e} -> {'detected' if c['detected'] else 'NOT detected'}"))
    print(f"  layers (o_proj / down_proj zeroed) move the float64 logits of prompt 0 by rel L2 "
          f"{results['checks'].get('layers_zeroed_rel_l2_prompt0', float('nan')):.3f}")
    print("\nFAIL:\n  - " + "\n  - ".join(failures) if failures else "\nPASS: every bar met")
    print(f"zmlx time by command: {json.dumps(results.get('zmlx_seconds'))} ({results['seconds']}s)")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
