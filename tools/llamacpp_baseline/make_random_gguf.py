#!/usr/bin/env python3
"""Write a GGUF with the real Qwen3-30B-A3B shapes (arch `qwen3moe`) and RANDOM weights.

Purpose: a llama.cpp speed baseline (llama-bench) that needs no model download. The
numbers it gives are speed numbers only: the weights are noise, the text is nonsense.

Tensor types (default):
  * every 2-D/3-D matrix, including token_embd, attention, router (ffn_gate_inp) and the
    stacked experts blk.N.ffn_{gate,up,down}_exps: Q4_0 (4.5 bits/weight)
  * output (lm_head): Q6_K (6.5625 bits/weight)  [--output-type q8_0|q4_0 to change]
  * norms (attn_norm, ffn_norm, attn_q_norm, attn_k_norm, output_norm): F32

Quantized blocks are random bytes (so the 4-/6-/8-bit codes are uniform) with a finite,
positive fp16 scale per block chosen so that the weight std is about 1/sqrt(fan_in):
no NaN/inf anywhere. Norm weights are 1 + 0.01*N(0,1).

The tokenizer is a minimal but valid gpt2-style byte-level BPE vocabulary of vocab_size
tokens: ids 0..255 are the 256 byte symbols, one merge ("Ġ Ġ" -> id 256), filler tokens,
and Qwen's special tokens at their real ids (151643 <|endoftext|>, 151644 <|im_start|>,
151645 <|im_end|>); ids past 151668 are [PADn] like a converted Qwen3 GGUF.

Uses llama.cpp's gguf-py (the standard GGUF writer); pass its location with --gguf-py
or put it on PYTHONPATH. Needs numpy. Writes tensor by tensor (peak RAM ~0.5 GB).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/work/llamacpp/qwen3-30b-a3b-random-q4_0.gguf")
    p.add_argument("--gguf-py", default="/work/llamacpp/src/gguf-py",
                   help="directory that contains the `gguf` package (llama.cpp/gguf-py)")
    p.add_argument("--seed", type=int, default=1234)
    # Qwen3-30B-A3B shapes (see shared/spec/architectures.md §1)
    p.add_argument("--n-layer", type=int, default=48)
    p.add_argument("--n-embd", type=int, default=2048)
    p.add_argument("--n-head", type=int, default=32)
    p.add_argument("--n-head-kv", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--n-expert", type=int, default=128)
    p.add_argument("--n-expert-used", type=int, default=8)
    p.add_argument("--n-ff-exp", type=int, default=768)
    p.add_argument("--n-ff", type=int, default=6144, help="dense FFN size (metadata only, as in the HF config)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--ctx", type=int, default=40960)
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--rms-eps", type=float, default=1e-6)
    p.add_argument("--output-type", choices=["q6_k", "q8_0", "q4_0"], default="q6_k")
    p.add_argument("--router-type", choices=["q4_0", "f32"], default="q4_0",
                   help="type of blk.N.ffn_gate_inp (llama-quantize would keep it f32; default q4_0)")
    return p.parse_args()


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


def build_vocab(n_vocab: int, gguf):
    TT = gguf.TokenType
    tokens: list[str] = []
    types: list[int] = []
    byte_syms = gpt2_byte_symbols()
    for s in byte_syms:
        tokens.append(s)
        types.append(TT.NORMAL)
    space = byte_syms[ord(" ")]          # "Ġ"
    tokens.append(space + space)          # id 256, target of the only merge
    types.append(TT.NORMAL)
    merges = [f"{space} {space}"]

    specials = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
    for i in range(len(tokens), n_vocab):
        if i in specials:
            tokens.append(specials[i])
            types.append(TT.CONTROL)
        elif i > 151645:  # (Qwen's other added tokens 151646..151668 are not needed here)
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
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
        np = self.np
        out = np.empty(n, dtype=np.uint8)
        step = 1 << 26
        for o in range(0, n, step):
            m = min(step, n - o)
            out[o:o + m] = np.frombuffer(self.rng.bytes(m), dtype=np.uint8)
        return out

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

    Q = gguf.GGMLQuantizationType
    qtype_out = {"q6_k": Q.Q6_K, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[args.output_type]
    qtype_router = Q.Q4_0 if args.router_type == "q4_0" else Q.F32

    E, H, HKV, D = args.n_embd, args.n_head, args.n_head_kv, args.head_dim
    NE, FF, V, L = args.n_expert, args.n_ff_exp, args.vocab, args.n_layer

    # (name, numpy-order shape = reversed ggml ne, type, fan_in for the scale)
    specs: list[tuple[str, tuple[int, ...], object, int]] = []
    specs.append(("token_embd.weight", (V, E), Q.Q4_0, 2500))  # std 0.02 like an init
    for i in range(L):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (E,), Q.F32, 0),
            (b + "attn_q.weight", (H * D, E), Q.Q4_0, E),
            (b + "attn_k.weight", (HKV * D, E), Q.Q4_0, E),
            (b + "attn_v.weight", (HKV * D, E), Q.Q4_0, E),
            (b + "attn_q_norm.weight", (D,), Q.F32, 0),
            (b + "attn_k_norm.weight", (D,), Q.F32, 0),
            (b + "attn_output.weight", (E, H * D), Q.Q4_0, H * D),
            (b + "ffn_norm.weight", (E,), Q.F32, 0),
            (b + "ffn_gate_inp.weight", (NE, E), qtype_router, E),
            (b + "ffn_gate_exps.weight", (NE, FF, E), Q.Q4_0, E),
            (b + "ffn_up_exps.weight", (NE, FF, E), Q.Q4_0, E),
            (b + "ffn_down_exps.weight", (NE, E, FF), Q.Q4_0, FF),
        ]
    specs.append(("output_norm.weight", (E,), Q.F32, 0))
    specs.append(("output.weight", (V, E), qtype_out, E))

    rt = RandomTensors(np, gguf, args.seed)

    w = gguf.GGUFWriter(args.out, "qwen3moe")
    w.add_name("Qwen3-30B-A3B random-weights (speed baseline only)")
    w.add_type("model")
    w.add_context_length(args.ctx)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(args.n_ff)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_eps)
    w.add_expert_count(NE)
    w.add_expert_used_count(args.n_expert_used)
    w.add_expert_feed_forward_length(FF)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, toktypes, merges = build_vocab(V, gguf)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)
    w.add_pad_token_id(151643)
    w.add_add_bos_token(False)

    total = 0
    for name, shape, qt, _ in specs:
        n = int(np.prod(shape))
        if qt == Q.F32:
            nbytes = n * 4
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            nbytes = rt.nbytes(qt, n)
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            byte_shape = shape[:-1] + (shape[-1] // blk * size,)  # last axis in bytes
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
        total += nbytes
    print(f"{len(specs)} tensors, {total / 2**30:.2f} GiB of tensor data -> {args.out}", flush=True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    t0 = time.time()
    done = 0
    for k, (name, shape, qt, fan_in) in enumerate(specs):
        n = int(np.prod(shape))
        if qt == Q.F32:
            if fan_in == 0:   # norm weight
                arr = (1.0 + 0.01 * rt.rng.standard_normal(n)).astype(np.float32)
            else:             # f32 matrix (router with --router-type f32)
                arr = (rt.rng.standard_normal(n) / math.sqrt(fan_in)).astype(np.float32)
        else:
            arr = rt.quant(qt, n, 1.0 / math.sqrt(fan_in))
        w.write_tensor_data(arr)
        done += arr.nbytes
        if k % 12 == 0 or k == len(specs) - 1:
            dt = time.time() - t0
            print(f"  [{k + 1}/{len(specs)}] {name}  {done / 2**30:.2f} GiB  {dt:.0f} s  "
                  f"({done / 2**20 / max(dt, 1e-9):.0f} MiB/s)", flush=True)
    w.close()
    print(f"done: {os.path.getsize(args.out)} bytes in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
