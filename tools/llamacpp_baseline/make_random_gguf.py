#!/usr/bin/env python3
"""Write a GGUF with the real shapes of one of zmlx's three MoE models and RANDOM weights.

Purpose: a llama.cpp speed baseline (llama-bench) that needs no model download. The
numbers it gives are speed numbers only: the weights are noise, the text is nonsense.

Presets (--arch), shapes from shared/spec/architectures.md:
  qwen3moe     Qwen3-30B-A3B   48 layers, GQA 32/4 x128, 128 experts / 8 used, expert FFN 768
  glm4moelite  GLM-4.7-Flash   llama.cpp arch `deepseek2` (MLA): 47 layers (layer 0 dense FFN
               10240), 20 heads, q_lora 768, kv_lora 512, qk_nope 192 + rope 64, v 256,
               64 experts / 4 used (sigmoid gate, expert bias, norm, scale 1.8), 1 shared
               expert, FFN 1536. The MTP block of the HF checkpoint is not written (as with
               the converter's --no-mtp; llama.cpp does not run it in llama-bench anyway).
  lfm2moe      LFM2-8B-A1B     24 layers: attention at 2,6,10,14,18,21 (32/8 x64), short conv
               (L=3) elsewhere; layers 0-1 dense FFN 7168; 32 experts / 4 used (sigmoid, expert
               bias), expert FFN 1792; tied embeddings.

Tensor types follow what `llama-quantize ... Q4_0` makes from a converted model:
  * every 2-D/3-D weight matrix (token_embd, attention incl. MLA q_a/q_b/kv_a_mqa/k_b/v_b,
    short-conv in/out projections, dense, shared and stacked expert FFNs): Q4_0 (4.5 bits/weight,
    the same bytes per weight as MLX 4-bit group 64: 16 B of codes + fp16 scale per 32 vs
    32 B of codes + bf16 scale + bf16 bias per 64)
  * the output matrix: Q6_K (6.5625 bits/weight) [--output-type]; with tied embeddings (LFM2)
    that is token_embd itself, as llama-quantize does it
  * routers (ffn_gate_inp): F32 [--router-type]; expert bias (exp_probs_b.bias), norms,
    short-conv kernels (shortconv.conv): F32

Quantized blocks are random bytes (so the 4-/6-bit codes are uniform) with a finite, positive
fp16 scale per block chosen so that the weight std is about 1/sqrt(fan_in) (fan_in = ggml ne0,
the contraction axis; 0.02 for token_embd): no NaN/inf anywhere. Norm weights are
1 + 0.01*N(0,1); F32 matrices N(0,1)/sqrt(fan_in); expert biases 0.01*N(0,1).

The tokenizer is a minimal but valid gpt2-style byte-level BPE vocabulary of the model's
vocab size: the 256 byte symbols, one merge ("Ġ Ġ"), filler tokens, and the model's main
special tokens at their real ids.

Uses llama.cpp's gguf-py (the standard GGUF writer); pass its location with --gguf-py
or put it on PYTHONPATH. Needs numpy. Writes tensor by tensor (peak RAM well under 1 GB).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ARCHES = ("qwen3moe", "glm4moelite", "lfm2moe")
ALIASES = {"deepseek2": "glm4moelite", "glm": "glm4moelite", "qwen3": "qwen3moe", "lfm2": "lfm2moe"}

# Shapes (HF config values; see shared/spec/architectures.md §1.1, §2.1, §3.1)
PRESETS: dict[str, dict] = {
    "qwen3moe": dict(
        gguf_arch="qwen3moe", name="Qwen3-30B-A3B",
        n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128,
        n_expert=128, n_expert_used=8, n_ff_exp=768, n_ff=6144,
        vocab=151936, ctx=40960, rope_theta=1e6, rms_eps=1e-6, tied=False,
        tok_pre="qwen2", add_bos=False,
        specials={151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
        pad_from=151646, bos=151643, eos=151645, pad=151643,
    ),
    "glm4moelite": dict(
        gguf_arch="deepseek2", name="GLM-4.7-Flash",
        n_layer=47, n_embd=2048, n_head=20, q_lora=768, kv_lora=512,
        qk_nope=192, qk_rope=64, v_head=256,
        n_expert=64, n_expert_used=4, n_expert_shared=1, n_ff_exp=1536, n_ff=10240,
        n_dense_lead=1, expert_scale=1.8, expert_norm=True,
        vocab=154880, ctx=202752, rope_theta=1e6, rms_eps=1e-5, tied=False,
        tok_pre="glm4", add_bos=False,
        specials={154820: "<|endoftext|>", 154822: "[gMASK]", 154824: "<sop>", 154826: "<|system|>",
                  154827: "<|user|>", 154828: "<|assistant|>", 154829: "<|observation|>"},
        pad_from=None, bos=154822, eos=154820, pad=154820, eot=154827, eom=154829,
    ),
    "lfm2moe": dict(
        gguf_arch="lfm2moe", name="LFM2-8B-A1B",
        n_layer=24, attn_layers=(2, 6, 10, 14, 18, 21), n_embd=2048, n_head=32, n_head_kv=8,
        conv_l=3, n_expert=32, n_expert_used=4, n_ff_exp=1792, n_ff=7168, n_dense_lead=2,
        vocab=65536, ctx=128000, rope_theta=1e6, rms_eps=1e-5, tied=True,
        tok_pre="lfm2", add_bos=True,
        specials={0: "<|pad|>", 1: "<|startoftext|>", 2: "<|endoftext|>", 6: "<|im_start|>",
                  7: "<|im_end|>"},
        pad_from=None, bos=1, eos=7, pad=0,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3moe", choices=sorted(ARCHES + tuple(ALIASES)),
                   help="model preset (deepseek2 = glm4moelite)")
    p.add_argument("--out", default=None, help="output file (default /tmp/<arch>-random-q4_0.gguf)")
    p.add_argument("--gguf-py", default="/work/llamacpp/src/gguf-py",
                   help="directory that contains the `gguf` package (llama.cpp/gguf-py)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-layer", type=int, default=None,
                   help="fewer layers for a quick load check (the preset's first N layers)")
    p.add_argument("--output-type", choices=["q6_k", "q8_0", "q4_0"], default="q6_k")
    p.add_argument("--router-type", choices=["f32", "q4_0"], default="f32",
                   help="type of blk.N.ffn_gate_inp (llama-quantize keeps it f32)")
    p.add_argument("--list", action="store_true", help="print the tensor table and exit (writes nothing)")
    a = p.parse_args()
    a.arch = ALIASES.get(a.arch, a.arch)
    if a.out is None:
        a.out = f"/tmp/{a.arch}-random-q4_0.gguf"
    return a


# ----------------------------------------------------------------------------------------
# tensor tables: (name, ggml ne (fastest axis first), kind) with kind in
#   "q"      weight matrix -> Q4_0 (fan_in = ne[0])
#   "out"    the output matrix -> --output-type
#   "embd"   token embedding -> Q4_0 (or --output-type when tied)
#   "router" ffn_gate_inp -> --router-type
#   "norm"   F32, 1 + 0.01 N(0,1)
#   "bias"   F32, 0.01 N(0,1)
#   "f32"    F32 matrix, N(0,1)/sqrt(ne[0])

def dense_ffn(b: str, E: int, FF: int) -> list[tuple[str, tuple[int, ...], str]]:
    """A dense SwiGLU MLP's three matrices (layer prefix b)."""
    return [(b + "ffn_gate.weight", (E, FF), "q"), (b + "ffn_up.weight", (E, FF), "q"),
            (b + "ffn_down.weight", (FF, E), "q")]


def routed_experts(b: str, E: int, FFE: int, NE: int, bias: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """Router (F32, + the selection bias when the arch has one) and the stacked experts."""
    t = [(b + "ffn_gate_inp.weight", (E, NE), "router")]
    if bias:
        t.append((b + "exp_probs_b.bias", (NE,), "bias"))
    return t + [(b + "ffn_gate_exps.weight", (E, FFE, NE), "q"), (b + "ffn_up_exps.weight", (E, FFE, NE), "q"),
                (b + "ffn_down_exps.weight", (FFE, E, NE), "q")]


def tensors_qwen3moe(h: dict) -> list[tuple[str, tuple[int, ...], str]]:
    E, H, HKV, D = h["n_embd"], h["n_head"], h["n_head_kv"], h["head_dim"]
    NE, FF, V = h["n_expert"], h["n_ff_exp"], h["vocab"]
    t = [("token_embd.weight", (E, V), "embd")]
    for i in range(h["n_layer"]):
        b = f"blk.{i}."
        t += [
            (b + "attn_norm.weight", (E,), "norm"),
            (b + "attn_q.weight", (E, H * D), "q"),
            (b + "attn_k.weight", (E, HKV * D), "q"),
            (b + "attn_v.weight", (E, HKV * D), "q"),
            (b + "attn_q_norm.weight", (D,), "norm"),
            (b + "attn_k_norm.weight", (D,), "norm"),
            (b + "attn_output.weight", (H * D, E), "q"),
            (b + "ffn_norm.weight", (E,), "norm"),
        ]
        t += routed_experts(b, E, FF, NE, bias=False)
    t.append(("output_norm.weight", (E,), "norm"))
    t.append(("output.weight", (E, V), "out"))
    return t


def tensors_glm4moelite(h: dict) -> list[tuple[str, tuple[int, ...], str]]:
    E, H, V = h["n_embd"], h["n_head"], h["vocab"]
    QL, KVL, NOPE, ROPE, VH = h["q_lora"], h["kv_lora"], h["qk_nope"], h["qk_rope"], h["v_head"]
    NE, FFE, FF, NSH = h["n_expert"], h["n_ff_exp"], h["n_ff"], h["n_expert_shared"]
    t = [("token_embd.weight", (E, V), "embd")]
    for i in range(h["n_layer"]):
        b = f"blk.{i}."
        t += [
            (b + "attn_norm.weight", (E,), "norm"),
            (b + "attn_q_a.weight", (E, QL), "q"),
            (b + "attn_q_a_norm.weight", (QL,), "norm"),
            (b + "attn_q_b.weight", (QL, H * (NOPE + ROPE)), "q"),
            (b + "attn_kv_a_mqa.weight", (E, KVL + ROPE), "q"),
            (b + "attn_kv_a_norm.weight", (KVL,), "norm"),
            # kv_b_proj split per head as the converter does: k_b transposed, v_b as is
            (b + "attn_k_b.weight", (NOPE, KVL, H), "q"),
            (b + "attn_v_b.weight", (KVL, VH, H), "q"),
            (b + "attn_output.weight", (H * VH, E), "q"),
            (b + "ffn_norm.weight", (E,), "norm"),
        ]
        if i < h["n_dense_lead"]:
            t += dense_ffn(b, E, FF)
        else:
            t += routed_experts(b, E, FFE, NE, bias=True) + [
                (b + "ffn_gate_shexp.weight", (E, FFE * NSH), "q"),
                (b + "ffn_up_shexp.weight", (E, FFE * NSH), "q"),
                (b + "ffn_down_shexp.weight", (FFE * NSH, E), "q"),
            ]
    t.append(("output_norm.weight", (E,), "norm"))
    t.append(("output.weight", (E, V), "out"))
    return t


def tensors_lfm2moe(h: dict) -> list[tuple[str, tuple[int, ...], str]]:
    E, H, HKV, V = h["n_embd"], h["n_head"], h["n_head_kv"], h["vocab"]
    D = E // H
    NE, FFE, FF = h["n_expert"], h["n_ff_exp"], h["n_ff"]
    t = [("token_embd.weight", (E, V), "embd")]
    for i in range(h["n_layer"]):
        b = f"blk.{i}."
        t.append((b + "attn_norm.weight", (E,), "norm"))            # operator_norm
        if i in h["attn_layers"]:
            t += [
                (b + "attn_q.weight", (E, H * D), "q"),
                (b + "attn_k.weight", (E, HKV * D), "q"),
                (b + "attn_v.weight", (E, HKV * D), "q"),
                (b + "attn_q_norm.weight", (D,), "norm"),
                (b + "attn_k_norm.weight", (D,), "norm"),
                (b + "attn_output.weight", (E, E), "q"),
            ]
        else:
            t += [
                (b + "shortconv.conv.weight", (h["conv_l"], E), "f32"),
                (b + "shortconv.in_proj.weight", (E, 3 * E), "q"),
                (b + "shortconv.out_proj.weight", (E, E), "q"),
            ]
        t.append((b + "ffn_norm.weight", (E,), "norm"))
        if i < h["n_dense_lead"]:
            t += dense_ffn(b, E, FF)
        else:
            t += routed_experts(b, E, FFE, NE, bias=True)
    t.append(("token_embd_norm.weight", (E,), "norm"))   # LFM2's final norm (llama.cpp's name)
    return t


TENSORS = {"qwen3moe": tensors_qwen3moe, "glm4moelite": tensors_glm4moelite, "lfm2moe": tensors_lfm2moe}


def write_hparams(w, h: dict, gguf, arch: str) -> None:
    w.add_context_length(h["ctx"])
    w.add_embedding_length(h["n_embd"])
    w.add_block_count(h["n_layer"])
    w.add_feed_forward_length(h["n_ff"])
    w.add_head_count(h["n_head"])
    w.add_rope_freq_base(h["rope_theta"])
    w.add_layer_norm_rms_eps(h["rms_eps"])
    w.add_expert_count(h["n_expert"])
    w.add_expert_used_count(h["n_expert_used"])
    w.add_expert_feed_forward_length(h["n_ff_exp"])
    if arch == "qwen3moe":
        w.add_head_count_kv(h["n_head_kv"])
        w.add_key_length(h["head_dim"])
        w.add_value_length(h["head_dim"])
    elif arch == "glm4moelite":
        # MLA is stored as MQA over the latent: 1 KV head, K = kv_lora + rope, V = kv_lora
        w.add_head_count_kv(1)
        w.add_expert_group_count(1)
        w.add_expert_group_used_count(1)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_leading_dense_block_count(h["n_dense_lead"])
        w.add_vocab_size(h["vocab"])
        w.add_q_lora_rank(h["q_lora"])
        w.add_kv_lora_rank(h["kv_lora"])
        w.add_key_length(h["kv_lora"] + h["qk_rope"])
        w.add_value_length(h["kv_lora"])
        w.add_key_length_mla(h["qk_nope"] + h["qk_rope"])
        w.add_value_length_mla(h["v_head"])
        w.add_expert_shared_count(h["n_expert_shared"])
        w.add_expert_weights_scale(h["expert_scale"])
        w.add_expert_weights_norm(h["expert_norm"])
        w.add_rope_dimension_count(h["qk_rope"])
    elif arch == "lfm2moe":
        w.add_head_count_kv([h["n_head_kv"] if i in h["attn_layers"] else 0 for i in range(h["n_layer"])])
        w.add_leading_dense_block_count(h["n_dense_lead"])
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_vocab_size(h["vocab"])
        w.add_shortconv_l_cache(h["conv_l"])
    else:
        raise ValueError(arch)


def gpt2_byte_symbols() -> list[str]:
    """The 256 printable symbols that byte-level BPE uses for the bytes 0..255 (index = byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    sym = {}
    extra = 0
    for b in range(256):
        if b in keep:
            sym[b] = chr(b)
        else:
            sym[b] = chr(256 + extra)
            extra += 1
    return [sym[b] for b in range(256)]


def build_vocab(n_vocab: int, specials: dict[int, str], pad_from: int | None, gguf):
    """Specials at their ids; the other ids in order: 256 byte symbols, "ĠĠ", fillers
    (ids >= pad_from that are not special: [PAD<i>], unused, like a converted Qwen3)."""
    TT = gguf.TokenType
    byte_syms = gpt2_byte_symbols()
    space = byte_syms[ord(" ")]          # "Ġ"
    regular = byte_syms + [space + space]
    merges = [f"{space} {space}"]
    tokens: list[str] = []
    types: list[int] = []
    k = 0
    for i in range(n_vocab):
        if i in specials:
            tokens.append(specials[i])
            types.append(TT.CONTROL)
        elif pad_from is not None and i >= pad_from:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif k < len(regular):
            tokens.append(regular[k])
            types.append(TT.NORMAL)
            k += 1
        else:
            tokens.append(f"tok{i}")
            types.append(TT.NORMAL)
    assert len(tokens) == n_vocab and len(set(tokens)) == n_vocab
    return tokens, types, merges


class RandomTensors:
    """Random raw bytes for GGML block types, with sane fp16 block scales."""

    def __init__(self, np, gguf, seed: int):
        self.np = np
        self.gguf = gguf
        self.rng = np.random.default_rng(seed)

    def nbytes(self, qtype, n_elem: int) -> int:
        blk, size = self.gguf.GGML_QUANT_SIZES[qtype]
        assert n_elem % blk == 0, (qtype, n_elem)
        return n_elem // blk * size

    def _rand_bytes(self, n: int):
        # raw 64-bit draws of the bit generator: ~10x faster than Generator.bytes()
        raw = self.rng.bit_generator.random_raw((n + 7) // 8)
        return raw.view(self.np.uint8)[:n]

    def _scales(self, n_blocks: int, base: float):
        np = self.np
        d = (base * self.rng.uniform(0.75, 1.25, n_blocks)).astype(np.float16)
        assert np.isfinite(d).all() and (d > 0).all()
        return d.view(np.uint8).reshape(n_blocks, 2)

    def quant(self, qtype, n_elem: int, target_std: float):
        np = self.np
        Q = self.gguf.GGMLQuantizationType
        blk, size = self.gguf.GGML_QUANT_SIZES[qtype]
        nb = n_elem // blk
        raw = self._rand_bytes(nb * size).reshape(nb, size)
        if qtype == Q.Q4_0:
            # block: fp16 d, 16 bytes of nibbles; w = d*(q-8), q uniform 0..15 -> std(q-8) ~ 4.61
            raw[:, 0:2] = self._scales(nb, target_std / 4.61)
        elif qtype == Q.Q8_0:
            # block: fp16 d, 32 int8; w = d*q, q uniform -128..127 -> std ~ 73.9
            raw[:, 0:2] = self._scales(nb, target_std / 73.9)
        elif qtype == Q.Q6_K:
            # block: ql[128], qh[64], int8 scales[16], fp16 d; w = d*sc*(q-32), q uniform 0..63
            raw[:, 192:208] = self.rng.integers(1, 16, size=(nb, 16), dtype=np.uint8)  # sc in [1,15]
            # rms(sc) = sqrt(mean k^2, k=1..15) ~ 9.09, rms(q-32) ~ 18.48 -> rms(sc*(q-32)) ~ 168
            raw[:, 208:210] = self._scales(nb, target_std / 168.0)
        else:
            raise ValueError(qtype)
        return raw.reshape(-1)


def main() -> int:
    args = parse_args()
    sys.path.insert(0, args.gguf_py)
    import numpy as np
    import gguf

    h = dict(PRESETS[args.arch])
    if args.n_layer is not None:
        h["n_layer"] = args.n_layer
    Q = gguf.GGMLQuantizationType
    qtype_out = {"q6_k": Q.Q6_K, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[args.output_type]
    qtype_router = Q.Q4_0 if args.router_type == "q4_0" else Q.F32

    def qtype_of(kind: str):
        if kind in ("norm", "bias", "f32"):
            return Q.F32
        if kind == "router":
            return qtype_router
        if kind == "out" or (kind == "embd" and h["tied"]):
            return qtype_out
        return Q.Q4_0

    # (name, numpy-order shape = reversed ggml ne, type, kind, fan_in)
    specs = []
    for name, ne, kind in TENSORS[args.arch](h):
        fan_in = 2500 if kind == "embd" else ne[0]     # 2500 -> std 0.02 for the embedding
        specs.append((name, tuple(reversed(ne)), qtype_of(kind), kind, fan_in))

    rt = RandomTensors(np, gguf, args.seed)
    total = 0
    n_params = 0
    sizes = []
    for name, shape, qt, _, _ in specs:
        n = int(np.prod(shape))
        nbytes = n * 4 if qt == Q.F32 else rt.nbytes(qt, n)
        sizes.append(nbytes)
        total += nbytes
        n_params += n
    if args.list:
        for (name, shape, qt, kind, _), nb in zip(specs, sizes):
            print(f"{name:40s} {str(tuple(reversed(shape))):22s} {qt.name:5s} {nb}")
    print(f"{args.arch} ({h['gguf_arch']}): {len(specs)} tensors, {n_params} parameters, "
          f"{total} bytes of tensor data ({total / 2**30:.2f} GiB, {8 * total / n_params:.3f} bits/weight)",
          flush=True)
    if args.list:
        return 0

    w = gguf.GGUFWriter(args.out, h["gguf_arch"])
    w.add_name(f"{h['name']} random-weights (speed baseline only)")
    w.add_type("model")
    write_hparams(w, h, gguf, args.arch)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, toktypes, merges = build_vocab(h["vocab"], h["specials"], h["pad_from"], gguf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(h["tok_pre"])
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(h["bos"])
    w.add_eos_token_id(h["eos"])
    w.add_pad_token_id(h["pad"])
    if "eot" in h:
        w.add_eot_token_id(h["eot"])
    if "eom" in h:
        w.add_eom_token_id(h["eom"])
    w.add_add_bos_token(h["add_bos"])

    for (name, shape, qt, _, _), nbytes in zip(specs, sizes):
        if qt == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = shape[:-1] + (shape[-1] // blk * size,)  # last axis in bytes
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.time()
    done = 0
    for k, (name, shape, qt, kind, fan_in) in enumerate(specs):
        n = int(np.prod(shape))
        if qt == Q.F32:
            if kind == "norm":
                arr = (1.0 + 0.01 * rt.rng.standard_normal(n)).astype(np.float32)
            elif kind == "bias":
                arr = (0.01 * rt.rng.standard_normal(n)).astype(np.float32)
            else:             # f32 matrix (router, short-conv kernel)
                arr = (rt.rng.standard_normal(n) / math.sqrt(fan_in)).astype(np.float32)
        else:
            arr = rt.quant(qt, n, 1.0 / math.sqrt(fan_in))
        w.write_tensor_data(arr)
        done += arr.nbytes
        if k % 24 == 0 or k == len(specs) - 1:
            dt = time.time() - t0
            print(f"  [{k + 1}/{len(specs)}] {name}  {done / 2**30:.2f} GiB  {dt:.0f} s  "
                  f"({done / 2**20 / max(dt, 1e-9):.0f} MiB/s)", flush=True)
    w.close()
    print(f"done: {args.out} {os.path.getsize(args.out)} bytes in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
