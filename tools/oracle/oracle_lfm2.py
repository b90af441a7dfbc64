#!/usr/bin/env python3
"""External-truth check for lfm2_moe (LFM2-8B-A1B layout): zmlx (CPU) against transformers'
Lfm2MoeForCausalLM on a small random model. Driver, bars and output: oracle_family.py (oracle.py's helpers).

The test model (defaults): vocab 1024, hidden 256, 6 layers with layer_types
[conv, full_attention, conv, conv, full_attention, conv] (short conv L_cache 3, no conv bias; GQA 4 heads / 2 KV
heads, head_dim 64, q/k layernorm), num_dense_layers 2 (layers 0-1 dense SwiGLU, intermediate 512), layers 2-5
MoE: 16 experts, top-4, moe_intermediate 128, sigmoid router with a random expert_bias N(0, 0.05) (F32, used for
selection only), norm_topk_prob, routed_scaling_factor 1.0, norm_eps 1e-5, rope_theta 1e6, tied embeddings.
Init: matrices N(0, 0.02), conv in_proj N(0, 0.04), conv kernel N(0, 0.3), norms 1 + N(0, 0.1), embedding
N(0, 0.3) with half its rows scaled by exp(|z|) (the tied head's rows get heavy-tailed norms, oracle.py
HEAD_ROW_SPREAD, so that the reference's argmax is rarely a bf16 near-tie), and the final embedding_norm weight
N(0, 1) (zero mean). Why the zero-mean final norm: the head is
tied, and the final hidden state is mostly the input token's own embedding (as in oracle.py, the embedding
carries about 2/3 of the residual stream so that bf16 noise stays low); with a final norm weight near 1 the
logit of the input token itself is ~sqrt(hidden) times larger than the others and the argmax is the input
token at ~100% of positions (measured), a trivial bar. With a zero-mean weight that self term averages out
(reference argmax == input token at < 1% of positions, recorded in results.json), and the logits have a
std of ~5. Making the layers dominate the residual stream instead (embedding N(0, 0.01)) makes the random
network chaotic: bf16 rounding alone then moves the logits by 2-4% (np_bf16 vs np_f64), above the bar.

Where transformers and MLX (mlx-lm lfm2_moe.py; zmlx follows MLX) differ, and what the reference does:
  - expert_bias: mlx-lm keeps it F32 (cast_predicate), and zmlx convert writes F32; transformers registers it as an
    fp32 buffer but `from_pretrained(dtype=bfloat16)` casts buffers with the model, so the biased selection
    scores (bf16 sigmoid + bias) would be computed from a bf16-rounded bias. -> the reference restores the exact
    F32 bias after loading (hf_bf16_as_is keeps whatever transformers did; its dtype is recorded).
  - router logits: mlx-lm takes sigmoid(bf16 logits) in bf16; transformers 5.x computes `self.gate(x)` in the
    model dtype too (bf16), so no change is needed; a forward hook on every router records the logits dtype,
    and if transformers ever returns fp32 logits in a bf16 model the hook rounds them to bf16 (counted).
  - norm eps: both use norm_eps (1e-5) for operator/ffn/q/k/embedding norms; checked on every RMSNorm module
    (a different variance_epsilon is set to norm_eps and reported).
  - short conv: both compute conv[t] = sum_k w[c, k] * Bx[t - (L-1) + k] (cross-correlation, zero left pad),
    Bx = B * x in bf16, y = C * conv; transformers uses nn.Conv1d (cuDNN) or causal_conv1d_fn if installed (the
    path taken is recorded); no change.
  - MoE combine: transformers multiplies each expert's output by its weight in bf16 and accumulates with
    index_add_ in bf16; MLX rounds the products to bf16 and sums them. Left alone (inside tolerance).
  - attention: eager softmax in fp32 rounded to bf16 before P @ V (MLX sdpa keeps fp32); RoPE cos/sin rounded to
    bf16 in transformers (MLX rotates in fp32). Left alone.

Usage (GPU machine, after tools/oracle/prepare_bin.sh; exits 1 if a bar fails):
  python3 tools/oracle/oracle_lfm2.py --zmlx tools/oracle/bin/zmlx --out $OUT/lfm2 --prompts 16
  python3 tools/oracle/oracle_lfm2.py --zmlx build/zmlx --out /tmp/oracle_lfm2 --selftest   # NumPy only
"""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (add_head_arg, bf16_round, f32_to_bf16_bits, mutated_copy, scale_head_rows,  # noqa: E402
                    set_ones, st_write, swap_experts_0_1, swap_gate_up)
import oracle_family  # noqa: E402


def layer_types(a) -> list:
    if a.layer_types:
        t = a.layer_types.split(",")
    else:
        t = ["full_attention" if i % 3 == 1 else "conv" for i in range(a.layers)]
    assert len(t) == a.layers and all(x in ("conv", "full_attention") for x in t), t
    return t


_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")
_DENSE = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$")
_HF2MLX = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
           "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


class Lfm2(oracle_family.Family):
    name = "lfm2_moe"
    tag = "oracle_lfm2"
    hf_model_class = "Lfm2MoeForCausalLM"
    hf_config_class = "Lfm2MoeConfig"
    has_alignment = True
    mutations = ("rope_theta_1e4", "conv_taps_reversed_layer_0", "expert_bias_zero_layer_2",
                 "swap_experts_0_1_every_moe_layer", "q_layernorm_ones_layer_1", "swap_gate_up_dense_layer_0")
    defaults = {"seed": 3141}

    def add_args(self, ap):
        ap.add_argument("--vocab", type=int, default=1024)
        ap.add_argument("--hidden", type=int, default=256)
        ap.add_argument("--layers", type=int, default=6)
        ap.add_argument("--layer-types", default="", help="comma-separated conv/full_attention "
                        "(default: full_attention at layers 1, 4, ...)")
        ap.add_argument("--dense-layers", type=int, default=2)
        ap.add_argument("--heads", type=int, default=4)
        ap.add_argument("--kv-heads", type=int, default=2)
        ap.add_argument("--intermediate", type=int, default=512)
        ap.add_argument("--experts", type=int, default=16)
        ap.add_argument("--top-k", type=int, default=4)
        ap.add_argument("--moe-inter", type=int, default=128)
        ap.add_argument("--conv-l", type=int, default=3)
        ap.add_argument("--scaling", type=float, default=1.0, help="routed_scaling_factor")
        ap.add_argument("--rope-theta", type=float, default=1e6)
        ap.add_argument("--init-std", type=float, default=0.02)
        ap.add_argument("--conv-in-std", type=float, default=0.04)
        ap.add_argument("--conv-std", type=float, default=0.3)
        ap.add_argument("--embed-std", type=float, default=0.3)
        add_head_arg(ap)
        ap.add_argument("--final-norm", type=float, default=0.0, help="mean of the embedding_norm weight")
        ap.add_argument("--final-norm-std", type=float, default=1.0, help="std of the embedding_norm weight")
        ap.add_argument("--bias-std", type=float, default=0.05)
        ap.add_argument("--norm-jitter", type=float, default=0.1)

    def hf_config_kwargs(self, a) -> dict:
        return dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                    moe_intermediate_size=a.moe_inter, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                    num_key_value_heads=a.kv_heads, conv_bias=False, conv_L_cache=a.conv_l,
                    num_dense_layers=a.dense_layers, num_experts_per_tok=a.top_k, num_experts=a.experts,
                    use_expert_bias=True, routed_scaling_factor=a.scaling, norm_topk_prob=True,
                    layer_types=layer_types(a), norm_eps=1e-5, max_position_embeddings=4096,
                    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta})

    def init_value(self, name, shape, normal, a):
        if name.endswith("expert_bias"):
            return a.bias_std * normal(shape)
        if name.endswith("embedding_norm.weight"):
            return a.final_norm + a.final_norm_std * normal(shape)
        if len(shape) == 1:
            return 1.0 + a.norm_jitter * normal(shape)
        if "embed_tokens" in name or name == "lm_head.weight":  # tied head: heavy-tailed row norms (oracle.py)
            return scale_head_rows(a.embed_std * normal(shape), a.head_row_spread, a.seed)
        if name.endswith("conv.conv.weight"):
            return a.conv_std * normal(shape)
        if name.endswith("conv.in_proj.weight"):
            return a.conv_in_std * normal(shape)
        return a.init_std * normal(shape)

    def extra_buffers(self):
        return ("expert_bias",)

    def fp32_buffers(self):
        return ("expert_bias",)

    # ------------------------------------------------------------------ NumPy checkpoint (selftest)

    def write_numpy_checkpoint(self, a, hf_dir):
        """The transformers layout as the original LiquidAI checkpoint has it: per-expert w1/w3/w2, dense
        w1/w3/w2, Conv1d kernel [D, 1, L], F32 expert_bias, a tied lm_head copy (convert must drop it)."""
        os.makedirs(hf_dir, exist_ok=True)
        cfg = {"architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "dtype": "bfloat16",
               "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, **self.hf_config_kwargs(a)}
        json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"), indent=2)
        rng = np.random.default_rng(a.seed)
        D, V, E, I, In = a.hidden, a.vocab, a.experts, a.moe_inter, a.intermediate
        hd = D // a.heads
        shapes = {"model.embed_tokens.weight": (V, D), "model.embedding_norm.weight": (D,)}
        types = layer_types(a)
        for l in range(a.layers):
            p = f"model.layers.{l}."
            shapes.update({p + "operator_norm.weight": (D,), p + "ffn_norm.weight": (D,)})
            if types[l] == "conv":
                shapes.update({p + "conv.in_proj.weight": (3 * D, D), p + "conv.out_proj.weight": (D, D),
                               p + "conv.conv.weight": (D, 1, a.conv_l)})
            else:
                shapes.update({p + "self_attn.q_proj.weight": (a.heads * hd, D),
                               p + "self_attn.k_proj.weight": (a.kv_heads * hd, D),
                               p + "self_attn.v_proj.weight": (a.kv_heads * hd, D),
                               p + "self_attn.out_proj.weight": (D, a.heads * hd),
                               p + "self_attn.q_layernorm.weight": (hd,), p + "self_attn.k_layernorm.weight": (hd,)})
            if l < a.dense_layers:
                shapes.update({p + "feed_forward.w1.weight": (In, D), p + "feed_forward.w3.weight": (In, D),
                               p + "feed_forward.w2.weight": (D, In)})
                continue
            shapes.update({p + "feed_forward.gate.weight": (E, D), p + "feed_forward.expert_bias": (E,)})
            for e in range(E):
                q = p + f"feed_forward.experts.{e}."
                shapes.update({q + "w1.weight": (I, D), q + "w3.weight": (I, D), q + "w2.weight": (D, I)})
        tensors, orig = {}, {}
        for name in sorted(shapes):
            v = np.asarray(self.init_value(name, shapes[name], lambda s: rng.standard_normal(s), a), np.float32)
            if name.endswith("expert_bias"):
                tensors[name] = ("F32", v)
                orig[name] = v
            else:
                bits = f32_to_bf16_bits(v)
                tensors[name] = ("BF16", bits)
                orig[name] = bf16_round(v)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        orig["lm_head.weight"] = orig["model.embed_tokens.weight"]
        st_write(os.path.join(hf_dir, "model.safetensors"), tensors, {"format": "pt"})
        return orig, {k: list(v.shape) for k, v in orig.items()}

    # ------------------------------------------------------------------ MLX -> transformers names

    def mlx_to_hf(self, mlx, hf_shapes, cfg):
        out, notes, used = {}, [], set()

        def take(n):
            used.add(n)
            return mlx[n]

        for name, shape in hf_shapes.items():
            shape = tuple(shape)
            if name in mlx and tuple(mlx[name].shape) == shape:
                out[name] = take(name)
            elif name == "lm_head.weight":
                out[name] = take("model.embed_tokens.weight")
                notes.append("lm_head.weight = model.embed_tokens.weight (tied; no lm_head in the MLX files)")
            elif name.endswith("conv.conv.weight"):
                w = take(name)  # MLX [D, L, 1], transformers Conv1d [D, 1, L]: the same bytes
                out[name] = np.ascontiguousarray(w.reshape(shape))
            elif (m := _DENSE.match(name)):
                out[name] = take(f"model.layers.{m.group(1)}.feed_forward.{_HF2MLX[m.group(2)]}.weight")
            elif (m := _PER_EXPERT.match(name)):
                sw = take(f"model.layers.{m.group(1)}.feed_forward.switch_mlp.{_HF2MLX[m.group(3)]}.weight")
                out[name] = sw[int(m.group(2))]
            elif (m := _FUSED.match(name)):
                pre = f"model.layers.{m.group(1)}.feed_forward.switch_mlp."
                if m.group(2) == "gate_up_proj":
                    g, u = take(pre + "gate_proj.weight"), take(pre + "up_proj.weight")  # [E, I, D]
                    a = np.concatenate([g, u], axis=1)  # [E, 2I, D], gate rows first (transformers' chunk(2))
                    if shape != a.shape and shape == (a.shape[0], a.shape[2], a.shape[1]):
                        a = a.transpose(0, 2, 1)
                        notes.append(f"{name}: stored [E, D, 2I]")
                    out[name] = np.ascontiguousarray(a)
                else:
                    dn = take(pre + "down_proj.weight")  # [E, D, I]
                    if shape != dn.shape and shape == (dn.shape[0], dn.shape[2], dn.shape[1]):
                        dn = dn.transpose(0, 2, 1)
                        notes.append(f"{name}: stored [E, I, D]")
                    out[name] = np.ascontiguousarray(dn)
            else:
                raise KeyError(f"transformers tensor {name} {shape}: no MLX tensor for it")
            assert tuple(out[name].shape) == shape, (name, out[name].shape, shape)
        unused = sorted(set(mlx) - used)
        if unused:
            raise KeyError(f"MLX tensors not used by the transformers model: {unused[:5]} ({len(unused)})")
        return out, notes

    # ------------------------------------------------------------------ NumPy forward, MLX semantics (spec §3.2)

    def np_forward(self, W, cfg, ids, bf16):
        D, H, Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = D // H
        eps = cfg.get("norm_eps", 1e-5)
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
        types = cfg.get("layer_types") or ["full_attention" if i in cfg["full_attn_idxs"] else "conv"
                                           for i in range(cfg["num_hidden_layers"])]
        k_top, E = cfg["num_experts_per_tok"], cfg["num_experts"]
        scaling, norm_topk = cfg.get("routed_scaling_factor", 1.0), cfg.get("norm_topk_prob", True)
        f = lambda n: W[n].astype(np.float64)  # noqa: E731
        R = (lambda x: bf16_round(np.asarray(x, dtype=np.float32)).astype(np.float64)) if bf16 else (lambda x: x)  # noqa: E731
        sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        T = len(ids)
        inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
        if bf16:
            ang = ang.astype(np.float32).astype(np.float64)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rms(x, w):
            return R(w * R(x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)))

        def lin(x, w):
            return R(x @ w.T)

        def rope(x):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return R(np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1))

        def swiglu(g, u):
            return R(R(g * R(sig(g))) * u)

        h = f("model.embed_tokens.weight")[np.asarray(ids)]
        mask = np.triu(np.ones((T, T), dtype=bool), 1)
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            x = rms(h, f(p + "operator_norm.weight"))
            if types[l] == "full_attention":
                q = rope(rms(lin(x, f(p + "self_attn.q_proj.weight")).reshape(T, H, hd), f(p + "self_attn.q_layernorm.weight")))
                k = rope(rms(lin(x, f(p + "self_attn.k_proj.weight")).reshape(T, Hkv, hd), f(p + "self_attn.k_layernorm.weight")))
                v = lin(x, f(p + "self_attn.v_proj.weight")).reshape(T, Hkv, hd)
                k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
                s = np.einsum("thd,shd->hts", q, k) * hd ** -0.5
                s[:, mask] = -np.inf
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                o = R(np.einsum("hts,shd->thd", s, v).reshape(T, H * hd))
                r = lin(o, f(p + "self_attn.out_proj.weight"))
            else:
                bcx = lin(x, f(p + "conv.in_proj.weight"))
                B, C, xv = bcx[:, :D], bcx[:, D:2 * D], bcx[:, 2 * D:]
                w = f(p + "conv.conv.weight").reshape(D, -1)  # [D, L]
                L = w.shape[1]
                seq = np.concatenate([np.zeros((L - 1, D)), R(B * xv)], axis=0)
                conv = R(sum(seq[j:j + T] * w[:, j] for j in range(L)))
                r = lin(R(C * conv), f(p + "conv.out_proj.weight"))
            h = R(h + r)
            a = rms(h, f(p + "ffn_norm.weight"))
            if p + "feed_forward.gate_proj.weight" in W:
                ff = lin(swiglu(lin(a, f(p + "feed_forward.gate_proj.weight")), lin(a, f(p + "feed_forward.up_proj.weight"))),
                         f(p + "feed_forward.down_proj.weight"))
            else:
                sw = R(sig(lin(a, f(p + "feed_forward.gate.weight"))))
                sel = sw + f(p + "feed_forward.expert_bias")
                top = np.argsort(-sel, axis=-1, kind="stable")[:, :k_top]
                wt = np.take_along_axis(sw, top, axis=-1)
                if norm_topk:
                    wt = R(wt / R(R(wt.sum(-1, keepdims=True)) + 1e-6))
                wt = R(wt * scaling)
                Wg, Wu, Wd = (f(p + f"feed_forward.switch_mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
                ff = np.zeros_like(h)
                for e in range(E):
                    rows, slot = np.nonzero(top == e)
                    if rows.size:
                        xe = a[rows]
                        ff[rows] += R(wt[rows, slot][:, None] * lin(swiglu(lin(xe, Wg[e]), lin(xe, Wu[e])), Wd[e]))
                ff = R(ff)
            h = R(h + ff)
        return lin(rms(h, f("model.embedding_norm.weight")), f("model.embed_tokens.weight"))

    # ------------------------------------------------------------------ transformers alignment

    def align(self, hf, model, dtype, mlx_aligned):
        torch = hf.torch
        info = {"expert_bias_dtype_as_loaded": None, "norm_eps_fixed": 0, "router_hooks": 0, "failures": []}
        eps = model.config.norm_eps
        for name, mod in model.named_modules():
            if "RMSNorm" in type(mod).__name__ and hasattr(mod, "variance_epsilon"):
                if mod.variance_epsilon != eps:
                    info.setdefault("notes", []).append(f"{name}: variance_epsilon {mod.variance_epsilon} != norm_eps {eps}")
                    if mlx_aligned:
                        mod.variance_epsilon = eps
                        info["norm_eps_fixed"] += 1
            if hasattr(mod, "expert_bias") and isinstance(mod.expert_bias, torch.Tensor):
                info["expert_bias_dtype_as_loaded"] = str(mod.expert_bias.dtype)
            if type(mod).__name__.endswith("ShortConv"):
                info["conv_path"] = ("causal_conv1d (cuda_kernels_forward)" if sys.modules[type(mod).__module__]
                                     .__dict__.get("is_fast_path_available") and hf.device == "cuda" else "nn.Conv1d (slow_forward)")
        if mlx_aligned:
            # exact F32 expert_bias (the bf16 load may have rounded it): from the weights we were given
            sd_bias = getattr(self, "_bias_values", {})
            for name, mod in model.named_modules():
                if hasattr(mod, "expert_bias") and isinstance(mod.expert_bias, torch.Tensor):
                    key = name + ".expert_bias"
                    if key in sd_bias:
                        mod._buffers["expert_bias"] = torch.from_numpy(sd_bias[key]).float().to(mod.expert_bias.device)
            info["router_hooks"] = self._hook_routers(hf, model, dtype)["hooks"]
        return info

    def _hook_routers(self, hf, model, dtype):
        torch = hf.torch
        seen = {"dtypes": set(), "rounded": 0, "hooks": 0}

        def hook(mod, inp, out):
            seen["dtypes"].add(str(out.dtype))
            if dtype == torch.bfloat16 and out.dtype == torch.float32:
                seen["rounded"] += 1
                return out.to(torch.bfloat16).float()
            return out

        for name, mod in model.named_modules():
            if name.endswith("feed_forward.gate") and isinstance(mod, torch.nn.Linear):
                mod.register_forward_hook(hook)
                seen["hooks"] += 1
        self._router_seen = seen
        return seen

    def after_run(self, hf, model):
        s = getattr(self, "_router_seen", None)
        if not s:
            return {}
        self._router_seen = None
        return {"router_logits": {"dtypes": sorted(s["dtypes"]), "rounded_to_bf16": s["rounded"], "hooks": s["hooks"]}}

    # ------------------------------------------------------------------ deliberate defects

    def mutate(self, src, dst, kind):
        mutated_copy(src, dst, kind, _lfm2_edit)

    def numpy_names(self, name, shape, cfg):
        raise NotImplementedError("no NumPy converter for lfm2_moe (expert stacking): zmlx convert is required")


def _lfm2_edit(kind: str, raw: dict) -> bool:
    if kind == "conv_taps_reversed_layer_0":
        name = "model.layers.0.conv.conv.weight"
        if name not in raw:
            return False
        dt, arr = raw[name]
        raw[name] = (dt, np.ascontiguousarray(arr[:, ::-1, :]))
        return True
    if kind == "expert_bias_zero_layer_2":
        name = "model.layers.2.feed_forward.expert_bias"
        if name not in raw:
            return False
        dt, arr = raw[name]
        raw[name] = (dt, np.zeros_like(arr))
        return True
    if kind == "swap_experts_0_1_every_moe_layer":
        return swap_experts_0_1(raw, ".feed_forward.switch_mlp.")
    if kind == "q_layernorm_ones_layer_1":
        return set_ones(raw, "model.layers.1.self_attn.q_layernorm.weight")
    if kind == "swap_gate_up_dense_layer_0":  # silu(up) * gate: the mlx-lm bug of 2026-01 (spec 0.3)
        return swap_gate_up(raw, "model.layers.0.feed_forward.")
    raise ValueError(kind)


class _Lfm2WithBias(Lfm2):
    """Keeps the F32 expert_bias values of the weights being loaded, for the MLX-aligned reference."""

    def mlx_to_hf(self, mlx, hf_shapes, cfg):
        out, notes = super().mlx_to_hf(mlx, hf_shapes, cfg)
        self._bias_values = {k: v.astype(np.float32) for k, v in out.items() if k.endswith("expert_bias")}
        return out, notes


if __name__ == "__main__":
    sys.exit(oracle_family.main(_Lfm2WithBias()))
