#!/usr/bin/env python3
"""Trains the tiny Qwen3-MoE model that ships with zmlx (models-shipped/zmlx-tiny-moe), end to end:

  1. a byte-level BPE tokenizer (Qwen2/3 pre-tokenizer regex, NFC, 4091 merges-vocab + 5 added tokens at the
     top: <|endoftext|> <|im_start|> <|im_end|> <think> </think> = ids 4091..4095), trained on the corpus;
  2. a Qwen3MoeForCausalLM (transformers) from a fixed seed on the corpus (tools/train_tiny/get_data.sh), a
     share of the documents wrapped in the chat template (user request -> the document as the answer), so
     chat mode answers in English and stops at <|im_end|>;
  3. save_pretrained (bf16) + tokenizer.json + tokenizer_config.json (chat template) + generation_config.json;
  4. `zmlx convert --bits 4 --group-size 64` (the carried binary) and reads the 4-bit weights back,
     dequantized exactly as MLX/zmlx see them (w = bf16(scale * q + bias)), into the transformers model;
  5. greedy continuations of candidate prompts with transformers (bf16 and fp32, eager attention, full
     recompute each step, stopping at the eos ids like zmlx) and with zmlx (CPU, every kernel variant the
     machine has); the golden file keeps prompts where all agree, widest top-1/top-2 margins first.

Run on the GPU machine (torch, transformers 5.17, tokenizers):
  python3 tools/train_tiny/train.py --data tools/train_tiny/data/corpus.txt --zmlx tools/oracle/bin/zmlx \
      --out $OUT --steps 2500
Outputs in --out: results.json (config, loss curve, golden candidates, agreement), golden.json,
mlx_model.tar (the converted 4-bit model directory), hf_checkpoint.tgz.part* (the bf16 checkpoint), train.log.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "oracle"))
from oracle import load_mlx, mlx_to_hf  # noqa: E402  (our own reader of the MLX layout)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# user turns for the chat-wrapped share of the corpus (fortunes answer the first list, Debian text the second)
ASK_FORTUNE = ["Tell me a fortune.", "Tell me a joke.", "Say something wise.", "Give me a quote.", "Hello",
               "Hi!", "Say something funny.", "What do you think?", "Tell me something.", "Any advice?",
               "Make me laugh.", "Tell me a story.", "What is on your mind?", "Give me a thought for the day."]
ASK_DEBIAN = ["Tell me about Debian.", "How does Debian work?", "Explain something about Linux.",
              "Tell me something about the system.", "What should I know about Debian?"]
PROMPTS_PLAIN = ["The meaning of life is", "A man walks into a bar", "Never trust a", "The computer",
                 "Love is", "In the beginning", "If you want to", "A good programmer", "The secret of",
                 "Why did the chicken", "Debian is", "The package manager", "Time flies", "My grandmother",
                 "Money", "There are two kinds of people", "The best way to", "Once upon a time", "All men are",
                 "You will", "It is a truth", "Life is", "The trouble with", "Happiness is", "Your lucky number",
                 "A fool", "To install a package", "The kernel", "Beware of", "Nothing is"]
PROMPTS_CHAT = ["Tell me a joke.", "Hello", "Say something wise.", "Tell me about Debian.", "Give me a quote.",
                "What do you think?", "Tell me a fortune.", "Any advice?", "Make me laugh.", "Tell me a story."]


def log(*a):
    print(*a, flush=True)


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# ----------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list, vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n_bpe = vocab_size - len(SPECIALS)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert tok.get_vocab_size() == n_bpe, f"BPE vocab {tok.get_vocab_size()} != {n_bpe}: corpus too small?"
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS[:3]])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in SPECIALS[3:]])
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert [ids[s] for s in SPECIALS] == list(range(n_bpe, vocab_size)), ids
    return tok, ids


def write_tokenizer_files(tok, ids: dict, d: str) -> None:
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": s in SPECIALS[:3]}
                                 for s in SPECIALS},
    }
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2, ensure_ascii=False)


def chat_text(user: str, answer: str | None = None) -> str:
    s = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return s if answer is None else s + answer + "<|im_end|>\n"


# ----------------------------------------------------------------------------------------------- model

def model_config(args, ids):
    from transformers import Qwen3MoeConfig
    kw = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
              moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers, num_attention_heads=args.heads,
              num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
              num_experts_per_tok=args.top_k, norm_topk_prob=True, rms_norm_eps=1e-6,
              max_position_embeddings=2048, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
              attention_bias=False, hidden_act="silu", initializer_range=0.02, output_router_logits=True,
              router_aux_loss_coef=args.aux_coef, bos_token_id=ids["<|endoftext|>"],
              eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    try:
        return Qwen3MoeConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta})
    except TypeError:
        return Qwen3MoeConfig(**kw, rope_theta=args.rope_theta)


def train(args, tok, ids, docs_train, docs_val, work):
    import torch
    from transformers import Qwen3MoeForCausalLM
    dev = "cuda"
    eot = ids["<|endoftext|>"]

    def stream(docs):
        out = []
        for e in tok.encode_batch(docs):
            out.extend(e.ids)
            out.append(eot)
        return torch.tensor(out, dtype=torch.long)

    t0 = time.time()
    tr, va = stream(docs_train), stream(docs_val)
    log(f"[train] tokens: train {tr.numel()}, val {va.numel()} ({time.time() - t0:.1f}s to encode)")
    torch.manual_seed(args.seed)
    cfg = model_config(args, ids)
    model = Qwen3MoeForCausalLM(cfg)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001
        pass
    model = model.to(dev).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * args.top_k // args.experts
    log(f"[train] params {n_params / 1e6:.2f}M (experts {n_expert / 1e6:.2f}M, active/token {n_active / 1e6:.2f}M), "
        f"experts impl {getattr(cfg, '_experts_implementation', None)}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    g = torch.Generator().manual_seed(args.seed + 1)
    T, B = args.seq, args.batch

    def batch(src, gen):
        starts = torch.randint(0, src.numel() - T - 1, (B,), generator=gen)
        return torch.stack([src[s: s + T] for s in starts.tolist()]).to(dev, non_blocking=True)

    @torch.no_grad()
    def evaluate():
        model.eval()
        gv = torch.Generator().manual_seed(999)
        losses = []
        for _ in range(args.eval_batches):
            x = batch(va, gv)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=x, labels=x, output_router_logits=False)
            losses.append(float(out.loss))
        model.train()
        return sum(losses) / len(losses)

    curve = []
    t_start = time.time()
    ema = None
    for step in range(args.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        x = batch(tr, g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            lv = float(loss)
            aux = float(out.aux_loss) if getattr(out, "aux_loss", None) is not None else None
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            row = {"step": step, "loss": round(lv, 4), "aux_loss": None if aux is None else round(aux, 4),
                   "lr": lr_at(step), "grad_norm": round(float(gn), 3), "seconds": round(time.time() - t_start, 1)}
            if step % args.eval_every == 0 or step == args.steps - 1:
                row["val_loss"] = round(evaluate(), 4)
            curve.append(row)
            el = time.time() - t_start
            log(f"[train] step {step:5d} loss {lv:.4f} aux {aux} val {row.get('val_loss', '')} lr {row['lr']:.2e} "
                f"gn {row['grad_norm']} {el:.0f}s ({(step + 1) * B * T / max(el, 1e-9) / 1e3:.0f}k tok/s)")
        if time.time() - t_start > args.max_minutes * 60:
            log(f"[train] STOPPED at step {step}: --max-minutes {args.max_minutes} reached (not the planned run)")
            curve.append({"step": step, "stopped_early": True})
            break
    final_val = evaluate()
    train_seconds = time.time() - t_start
    log(f"[train] done: final val loss {final_val:.4f} ({train_seconds:.0f}s)")
    model = model.to(torch.bfloat16).eval()
    model.config.output_router_logits = False
    hf_dir = os.path.join(work, "hf")
    model.save_pretrained(hf_dir)
    stats = {"params": n_params, "expert_params": n_expert, "active_params_per_token": n_active,
             "train_tokens": tr.numel(), "val_tokens": va.numel(), "tokens_seen": (curve[-1]["step"] + 1) * B * T,
             "final_val_loss": final_val, "final_train_loss_logged": curve[-1].get("loss"),
             "train_seconds": train_seconds, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    return hf_dir, curve, stats


# ----------------------------------------------------------------------------------------------- golden

def hf_greedy(model, prompt, max_new, eos, torch, dev):
    """Greedy, full recompute each step (no KV cache), stop before an eos id (zmlx's token_ids leave it out).
    Returns tokens, the top1-top2 logit gap of every step, and the finish reason."""
    seq, toks, gaps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([seq], dtype=torch.long, device=dev)
            lg = model(input_ids=x, use_cache=False).logits[0, -1].float()
            top = torch.topk(lg, 2)
            nxt = int(top.indices[0])
            gaps.append(float(top.values[0] - top.values[1]))
            if nxt in eos:
                return toks, gaps, "stop"
            toks.append(nxt)
            seq.append(nxt)
    return toks, gaps, "length"


def zmlx_generate(zmlx, model_dir, prompt_ids, max_new, env=None):
    p = run([zmlx, "generate", model_dir, "--ids", ",".join(map(str, prompt_ids)), "--max-tokens", str(max_new),
             "--json"], env=env)
    j = json.loads(p.stdout.strip().splitlines()[-1])
    return j


def golden(args, tok, ids, hf_dir, work, results):
    import torch
    from transformers import Qwen3MoeForCausalLM
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    except Exception:  # noqa: BLE001
        pass
    zmlx = os.path.abspath(args.zmlx)
    mlx_dir = os.path.join(work, "mlx")
    t0 = time.time()
    p = run([zmlx, "convert", hf_dir, mlx_dir, "--bits", "4", "--group-size", "64"])
    results["convert_log"] = (p.stdout + p.stderr)[-2000:]
    log(f"[golden] converted in {time.time() - t0:.1f}s: {sorted(os.listdir(mlx_dir))}")
    mlx, qinfo = load_mlx(mlx_dir)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]

    cands = [{"kind": "plain", "text": t, "prompt_ids": tok.encode(t).ids} for t in PROMPTS_PLAIN]
    cands += [{"kind": "chat", "text": t, "prompt_ids": tok.encode(chat_text(t)).ids} for t in PROMPTS_CHAT]
    refs = {}
    for name, dtype in (("hf_bf16", torch.bfloat16), ("hf_fp32", torch.float32)):
        m = Qwen3MoeForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").to(dev).eval()
        shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        hfw, notes = mlx_to_hf(mlx, shapes)
        m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in hfw.items()},
                          strict=True)
        for mod in m.modules():  # RoPE frequencies must stay fp32
            if hasattr(mod, "inv_freq") and mod.inv_freq.dtype != torch.float32:
                raise RuntimeError(f"inv_freq is {mod.inv_freq.dtype}")
        refs[name] = [hf_greedy(m, c["prompt_ids"], args.gen_tokens, eos, torch, dev) for c in cands]
        results.setdefault("mapping_notes", notes)
        del m
    # zmlx on this machine's CPU, every kernel variant it has
    isas = ["default", "avx2", "portable"]
    flags = open("/proc/cpuinfo").read()
    if "avx512_bf16" in flags and "avx512vbmi" in flags:
        isas.append("avx512")
    zres = {}
    for isa in isas:
        env = dict(os.environ)
        if isa != "default":
            env["ZMLX_CPU_ISA"] = isa
        zres[isa] = [zmlx_generate(zmlx, mlx_dir, c["prompt_ids"], args.gen_tokens, env) for c in cands]
    rows = []
    for i, c in enumerate(cands):
        tb, gb, fb = refs["hf_bf16"][i]
        tf, gf, ff = refs["hf_fp32"][i]
        z = {isa: zres[isa][i]["token_ids"] for isa in isas}
        row = dict(c, hf_bf16=tb, hf_fp32=tf, zmlx=z, finish_bf16=fb, finish_fp32=ff,
                   zmlx_finish=zres["default"][i]["finish_reason"], zmlx_text=zres["default"][i]["text"],
                   hf_text=tok.decode(tb, skip_special_tokens=False),
                   min_gap_bf16=min(gb), min_gap_fp32=min(gf),
                   bf16_eq_fp32=tb == tf, zmlx_eq_bf16={k: v == tb for k, v in z.items()},
                   zmlx_eq_fp32={k: v == tf for k, v in z.items()})
        row["all_agree"] = row["bf16_eq_fp32"] and all(row["zmlx_eq_bf16"].values())
        rows.append(row)
        log(f"[golden] {c['kind']:5s} {c['text']!r}: bf16==fp32 {row['bf16_eq_fp32']} zmlx==bf16 {row['zmlx_eq_bf16']} "
            f"min gap {row['min_gap_fp32']:.3f} -> {row['hf_text']!r}")
    results["candidates"] = rows
    results["agreement"] = {
        "candidates": len(rows), "tokens_per_candidate_max": args.gen_tokens,
        "hf_bf16_eq_hf_fp32": sum(r["bf16_eq_fp32"] for r in rows),
        "zmlx_eq_hf_bf16": {isa: sum(r["zmlx_eq_bf16"][isa] for r in rows) for isa in isas},
        "zmlx_eq_hf_fp32": {isa: sum(r["zmlx_eq_fp32"][isa] for r in rows) for isa in isas},
        "all_agree": sum(r["all_agree"] for r in rows)}
    log(f"[golden] agreement: {json.dumps(results['agreement'])}")
    # golden: agreeing candidates, widest margin first; at least 2 chat prompts where possible
    ok = sorted([r for r in rows if r["all_agree"]], key=lambda r: -r["min_gap_fp32"])
    chat = [r for r in ok if r["kind"] == "chat"][:2]
    plain = [r for r in ok if r["kind"] == "plain"][: args.golden - len(chat)]
    pick = plain + chat
    if len(pick) < args.golden:
        pick += [r for r in ok if r not in pick][: args.golden - len(pick)]
    gold = {"model": "models-shipped/zmlx-tiny-moe", "max_tokens": args.gen_tokens,
            "reference": "transformers %s greedy (bf16, eager attention, no KV cache) on the 4-bit weights "
                         "dequantized as bf16(scale*q + bias); equal to transformers fp32 and to zmlx on the "
                         "training machine's CPU (all kernel variants) for these prompts" % results["env"]["transformers"],
            "prompts": [{"kind": r["kind"], "text": r["text"], "prompt_ids": r["prompt_ids"], "token_ids": r["hf_bf16"],
                         "finish_reason": r["finish_bf16"], "text_out": r["hf_text"],
                         "min_top2_gap_fp32": round(r["min_gap_fp32"], 4)} for r in pick]}
    return mlx_dir, gold


# ----------------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--zmlx", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/train_tiny_work")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=256)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--chat-share", type=float, default=0.3)
    ap.add_argument("--val-share", type=float, default=0.02)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=6.0, help="safety stop (logged) if training runs long")
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--golden", type=int, default=5)
    args = ap.parse_args()

    import torch
    import tokenizers
    import transformers
    torch.use_deterministic_algorithms(True, warn_only=True)
    results = {"args": vars(args), "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                                           "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]}}
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    t_all = time.time()

    raw = open(args.data, encoding="utf-8").read()
    docs = [d for d in raw.split("\n%\n") if d.strip()]
    rng = random.Random(args.seed)
    rng.shuffle(docs)
    n_val = int(len(docs) * args.val_share)
    val, trn = docs[:n_val], docs[n_val:]
    # chat share: fortunes answer ASK_FORTUNE, Debian Reference paragraphs (single line, long) ASK_DEBIAN
    wrapped = []
    for d in trn:
        if rng.random() < args.chat_share:
            ask = rng.choice(ASK_DEBIAN if ("\n" not in d and len(d) > 200) else ASK_FORTUNE)
            wrapped.append(chat_text(ask, d))
        else:
            wrapped.append(d)
    results["data"] = {"documents": len(docs), "train_docs": len(trn), "val_docs": len(val),
                       "chat_wrapped": sum(w.startswith("<|im_start|>") for w in wrapped), "bytes": len(raw.encode())}
    t0 = time.time()
    tok, ids = train_tokenizer(trn, args.vocab)  # tokenizer: plain training documents only
    log(f"[tok] trained in {time.time() - t0:.1f}s; specials {ids}")
    enc = [tok.encode(d).ids for d in val[:200]]
    results["data"]["bytes_per_token_val"] = sum(len(d.encode()) for d in val[:200]) / sum(map(len, enc))
    results["special_ids"] = ids

    hf_dir, curve, stats = train(args, tok, ids, wrapped, val, args.work)
    results["train"] = stats
    results["curve"] = curve
    write_tokenizer_files(tok, ids, hf_dir)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    json.dump(gen, open(os.path.join(hf_dir, "generation_config.json"), "w"), indent=2)

    mlx_dir, gold = golden(args, tok, ids, hf_dir, args.work, results)
    json.dump(gold, open(os.path.join(args.out, "golden.json"), "w"), indent=1, ensure_ascii=False)
    results["seconds_total"] = time.time() - t_all
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1, ensure_ascii=False)
    with tarfile.open(os.path.join(args.out, "mlx_model.tar"), "w") as tf:
        tf.add(mlx_dir, arcname="zmlx-tiny-moe")
    with tarfile.open(os.path.join(args.work, "hf.tgz"), "w:gz") as tf:
        tf.add(hf_dir, arcname="hf_checkpoint")
    data = open(os.path.join(args.work, "hf.tgz"), "rb").read()
    part = 15 * 1024 * 1024
    for k in range(0, len(data), part):
        open(os.path.join(args.out, f"hf_checkpoint.tgz.part{k // part}"), "wb").write(data[k: k + part])
    log(f"[done] {time.time() - t_all:.0f}s total; golden prompts {len(gold['prompts'])}")
    return 0 if len(gold["prompts"]) >= args.golden else 1


if __name__ == "__main__":
    sys.exit(main())
