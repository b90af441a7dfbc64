#!/usr/bin/env python3
"""External-truth check for the dense Qwen3 family (model_type "qwen3", Qwen3ForCausalLM): zmlx (CPU) against
transformers on a small random model. Driver, bars and output: oracle_family.py (oracle.py's helpers).

The test model (defaults): vocab 1024, hidden 256, 4 layers, 8 heads / 2 KV heads, head_dim 64 (q/k RMSNorm
before RoPE), SwiGLU MLP (intermediate 512) in every layer, rms_norm_eps 1e-6, rope_theta 1e6, and tied
embeddings (as Qwen3-0.6B/1.7B/4B; --untied gives a separate lm_head as Qwen3-8B and larger: the untied head
is the path oracle.py already covers for qwen3_moe). Init as oracle.py: matrices N(0, 0.02), embedding
N(0, 0.3), norms 1 + N(0, 0.1); with the tied head the final norm weight is N(0, 1) (zero mean), for the
reason given in oracle_lfm2.py (otherwise the logits peak at the input token itself and the argmax bar is
trivial); with --untied, lm_head N(0, 0.1) and the final norm 1 + N(0, 0.1) as in oracle.py. The head's rows (the
embedding's when tied, else lm_head's) have heavy-tailed norms: half of them scaled by exp(|z|) (oracle.py,
HEAD_ROW_SPREAD), so that the reference's argmax is rarely a bf16 near-tie.

transformers and MLX (mlx-lm qwen3.py) compute the same network; no adjustment of the reference is needed
(hf_bf16_mlx is transformers as shipped; the RMSNorm eps of every module is checked against rms_norm_eps).
Differences left alone, inside the tolerance: eager attention rounds the softmax probabilities to bf16 before
P @ V, and transformers rounds RoPE's cos/sin to bf16 (MLX rotates in fp32).

mlx-lm's conversion of this family is a plain cast (+ quantization of every Linear and the embedding); the
lm_head is dropped when tie_word_embeddings is true. If `zmlx convert` rejects the checkpoint (e.g. no
"qwen3" entry in its family table), that is reported as a failure and the numeric checks run on this tool's
NumPy conversion with mlx-lm semantics (oracle_family.numpy_convert); --numpy-convert does that on purpose.

Usage (GPU machine, after tools/oracle/prepare_bin.sh; exits 1 if a bar fails):
  python3 tools/oracle/oracle_dense.py --zmlx tools/oracle/bin/zmlx --out $OUT/dense --prompts 16
  python3 tools/oracle/oracle_dense.py --zmlx build/zmlx --out /tmp/oracle_dense --selftest   # NumPy only
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import (add_head_arg, bf16_round, f32_to_bf16_bits, mutated_copy, scale_head_rows,  # noqa: E402
                    set_ones, st_write, swap_gate_up)
import oracle_family  # noqa: E402



def _dense_edit(kind: str, raw: dict, hd: int) -> bool:
    if kind == "q_norm_ones_layer_0":
        return set_ones(raw, "model.layers.0.self_attn.q_norm.weight")
    if kind == "k_norm_ones_layer_1":
        return set_ones(raw, "model.layers.1.self_attn.k_norm.weight")
    if kind == "swap_gate_up_layer_0":
        return swap_gate_up(raw, "model.layers.0.mlp.")
    if kind == "rope_traditional":
        # No config switch for the RoPE layout: rows of each q/k head (and the q/k norm weights)
        # reordered [0, 2, 4, ..., 1, 3, 5, ...], so half-rotation of the permuted head equals interleaved
        # rotation of the original (q.k is otherwise permutation invariant).
        perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
        changed = False
        for name in list(raw):
            if not any(p in name for p in (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.q_norm.",
                                           ".self_attn.k_norm.")):
                continue
            dt, arr = raw[name]
            if name.endswith("_norm.weight"):
                raw[name] = (dt, np.ascontiguousarray(arr[perm]))
            else:
                rows = arr.reshape(-1, hd, *arr.shape[1:])[:, perm]
                raw[name] = (dt, np.ascontiguousarray(rows.reshape(arr.shape)))
            changed = True
        return changed
    raise ValueError(kind)

class Dense(oracle_family.Family):
    name = "qwen3"
    tag = "oracle_dense"
    hf_model_class = "Qwen3ForCausalLM"
    hf_config_class = "Qwen3Config"
    has_alignment = False
    mutations = ("rope_theta_1e4", "q_norm_ones_layer_0", "k_norm_ones_layer_1", "swap_gate_up_layer_0",
                 "rope_traditional")
    defaults = {"seed": 2718}

    def add_args(self, ap):
        ap.add_argument("--vocab", type=int, default=1024)
        ap.add_argument("--hidden", type=int, default=256)
        ap.add_argument("--layers", type=int, default=4)
        ap.add_argument("--heads", type=int, default=8)
        ap.add_argument("--kv-heads", type=int, default=2)
        ap.add_argument("--head-dim", type=int, default=64)
        ap.add_argument("--intermediate", type=int, default=512)
        ap.add_argument("--untied", action="store_true", help="separate lm_head (tie_word_embeddings false)")
        ap.add_argument("--rope-theta", type=float, default=1e6)
        ap.add_argument("--init-std", type=float, default=0.02)
        ap.add_argument("--embed-std", type=float, default=0.3)
        ap.add_argument("--lm-head-std", type=float, default=0.1)
        add_head_arg(ap)
        ap.add_argument("--final-norm", type=float, default=None,
                        help="mean of model.norm.weight (default 0 when tied, 1 when untied)")
        ap.add_argument("--final-norm-std", type=float, default=None, help="std (default 1 tied, 0.1 untied)")
        ap.add_argument("--norm-jitter", type=float, default=0.1)

    def hf_config_kwargs(self, a):
        return dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                    num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                    head_dim=a.head_dim, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    tie_word_embeddings=not a.untied, attention_bias=False, hidden_act="silu",
                    initializer_range=a.init_std,
                    rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta})

    def init_value(self, name, shape, normal, a):
        if name == "model.norm.weight":
            mean = a.final_norm if a.final_norm is not None else (1.0 if a.untied else 0.0)
            std = a.final_norm_std if a.final_norm_std is not None else (a.norm_jitter if a.untied else 1.0)
            return mean + std * normal(shape)
        if len(shape) == 1:
            return 1.0 + a.norm_jitter * normal(shape)
        # the head's rows get heavy-tailed norms (oracle.py): the lm_head's when untied, else the embedding's
        if "embed_tokens" in name:
            v = a.embed_std * normal(shape)
            return v if a.untied else scale_head_rows(v, a.head_row_spread, a.seed)
        if name == "lm_head.weight":
            return scale_head_rows((a.lm_head_std if a.untied else a.embed_std) * normal(shape), a.head_row_spread,
                                   a.seed)
        return a.init_std * normal(shape)

    def write_numpy_checkpoint(self, a, hf_dir):
        os.makedirs(hf_dir, exist_ok=True)
        cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "dtype": "bfloat16",
               "bos_token_id": 151643, "eos_token_id": 151645, **self.hf_config_kwargs(a)}
        json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"), indent=2)
        rng = np.random.default_rng(a.seed)
        D, V, I, H, Hkv, hd = a.hidden, a.vocab, a.intermediate, a.heads, a.kv_heads, a.head_dim
        shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
        if a.untied:
            shapes["lm_head.weight"] = (V, D)
        for l in range(a.layers):
            p = f"model.layers.{l}."
            shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                           p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hkv * hd, D),
                           p + "self_attn.v_proj.weight": (Hkv * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                           p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                           p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                           p + "mlp.down_proj.weight": (D, I)})
        tensors, orig = {}, {}
        for name in sorted(shapes):
            v = np.asarray(self.init_value(name, shapes[name], lambda s: rng.standard_normal(s), a), np.float32)
            bits = f32_to_bf16_bits(v)
            tensors[name] = ("BF16", bits)
            orig[name] = bf16_round(v)
        if not a.untied:  # transformers' in-memory state_dict has the tied head under both names
            orig["lm_head.weight"] = orig["model.embed_tokens.weight"]
        st_write(os.path.join(hf_dir, "model.safetensors"), tensors, {"format": "pt"})
        return orig, {k: list(v.shape) for k, v in orig.items()}

    def mlx_to_hf(self, mlx, hf_shapes, cfg):
        out, notes, used = {}, [], set()
        for name, shape in hf_shapes.items():
            src = name
            if name not in mlx and name == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
                src = "model.embed_tokens.weight"
                notes.append("lm_head.weight = model.embed_tokens.weight (tied; no lm_head in the MLX files)")
            if src not in mlx:
                raise KeyError(f"transformers tensor {name} {shape}: no MLX tensor for it")
            assert tuple(mlx[src].shape) == tuple(shape), (name, mlx[src].shape, shape)
            out[name] = mlx[src]
            used.add(src)
        unused = sorted(set(mlx) - used)
        if unused:
            raise KeyError(f"MLX tensors not used by the transformers model: {unused[:5]} ({len(unused)})")
        return out, notes

    def np_forward(self, W, cfg, ids, bf16):
        D, H, Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or D // H
        eps = cfg.get("rms_norm_eps", 1e-6)
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
        f = lambda n: W[n].astype(np.float64)  # noqa: E731
        R = (lambda x: bf16_round(np.asarray(x, dtype=np.float32)).astype(np.float64)) if bf16 else (lambda x: x)  # noqa: E731
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

        h = f("model.embed_tokens.weight")[np.asarray(ids)]
        mask = np.triu(np.ones((T, T), dtype=bool), 1)
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            x = rms(h, f(p + "input_layernorm.weight"))
            q = rope(rms(lin(x, f(p + "self_attn.q_proj.weight")).reshape(T, H, hd), f(p + "self_attn.q_norm.weight")))
            k = rope(rms(lin(x, f(p + "self_attn.k_proj.weight")).reshape(T, Hkv, hd), f(p + "self_attn.k_norm.weight")))
            v = lin(x, f(p + "self_attn.v_proj.weight")).reshape(T, Hkv, hd)
            k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
            s = np.einsum("thd,shd->hts", q, k) * hd ** -0.5
            s[:, mask] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = R(np.einsum("hts,shd->thd", s, v).reshape(T, H * hd))
            h = R(h + lin(o, f(p + "self_attn.o_proj.weight")))
            a = rms(h, f(p + "post_attention_layernorm.weight"))
            g, u = lin(a, f(p + "mlp.gate_proj.weight")), lin(a, f(p + "mlp.up_proj.weight"))
            h = R(h + lin(R(R(g * R(1.0 / (1.0 + np.exp(-g)))) * u), f(p + "mlp.down_proj.weight")))
        head = "lm_head.weight" if "lm_head.weight" in W else "model.embed_tokens.weight"
        return lin(rms(h, f("model.norm.weight")), f(head))

    def align(self, hf, model, dtype, mlx_aligned):
        info = {}
        eps = model.config.rms_norm_eps
        for name, mod in model.named_modules():
            if "RMSNorm" in type(mod).__name__ and getattr(mod, "variance_epsilon", eps) != eps:
                info.setdefault("failures", []).append(f"{name}: variance_epsilon {mod.variance_epsilon} != {eps}")
        return info

    def mutate(self, src, dst, kind):
        hd = json.load(open(os.path.join(src, "config.json"))).get("head_dim")
        mutated_copy(src, dst, kind, lambda k, raw: _dense_edit(k, raw, hd))

    def numpy_names(self, name, shape, cfg):
        """mlx-lm qwen3: names unchanged; lm_head dropped when tied; Linear/Embedding quantized, norms kept."""
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
            return None, None
        if name.endswith("rotary_emb.inv_freq"):
            return None, None
        return name, ("keep" if len(shape) == 1 else "linear")


if __name__ == "__main__":
    sys.exit(oracle_family.main(Dense()))
