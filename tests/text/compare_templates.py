#!/usr/bin/python3
"""Renders chat templates with Jinja2 exactly as transformers does
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols,
HF's tojson / raise_exception / strftime_now) and compares with `zmlx template`.

  compare_templates.py ZMLX QWEN3_MODEL_DIR

Part 1: the real Qwen3 chat template over conversations.json (+ tools.json).
Part 2: small templates exercising Jinja constructs (constructs.json), each
rendered from a scratch model directory holding chat_template.jinja. Entries
marked "unsupported" must fail with an error naming the construct and line.
"""
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def special_tokens(config):
    out = {}
    for k in ("bos_token", "eos_token"):
        v = config.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if v is not None:
            out[k] = v
    return out


def reference(template, config, messages, tools, add_generation_prompt, extra):
    ctx = dict(messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt)
    ctx.update(special_tokens(config))
    ctx.update(extra)
    return hf_environment().from_string(template).render(**ctx)


def run_zmlx(zmlx, model_dir, tmp, messages, tools, add_generation_prompt, extra):
    mpath = os.path.join(tmp, "messages.json")
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(messages, f, ensure_ascii=False)
    cmd = [zmlx, "template", model_dir, "--messages", mpath]
    if tools is not None:
        tpath = os.path.join(tmp, "tools.json")
        with open(tpath, "w", encoding="utf-8") as f:
            json.dump(tools, f, ensure_ascii=False)
        cmd += ["--tools", tpath]
    if not add_generation_prompt:
        cmd.append("--no-generation-prompt")
    for k, v in extra.items():
        cmd += ["--set", f"{k}={json.dumps(v, ensure_ascii=False)}"]
    p = subprocess.run(cmd, capture_output=True)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def show_diff(name, got, want):
    print(f"MISMATCH {name}")
    print(f"  zmlx: {got!r}"[:1500])
    print(f"  jinja: {want!r}"[:1500])


def write_tiny_model(path, template):
    os.makedirs(path, exist_ok=True)
    vocab = {chr(c): c for c in range(33, 127)}
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
           "decoder": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "tiny"}, f)
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)


def main():
    zmlx, model_dir = sys.argv[1], sys.argv[2]
    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    template = config["chat_template"]
    with open(os.path.join(HERE, "conversations.json"), encoding="utf-8") as f:
        cases = json.load(f)
    with open(os.path.join(HERE, "tools.json"), encoding="utf-8") as f:
        toolsets = json.load(f)
    ok = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            total += 1
            tools = toolsets[case["tools"]] if "tools" in case else None
            agp = case.get("add_generation_prompt", True)
            extra = case.get("extra", {})
            want = reference(template, config, case["messages"], tools, agp, extra)
            rc, got, err = run_zmlx(zmlx, model_dir, tmp, case["messages"], tools, agp, extra)
            if rc == 0 and got == want:
                ok += 1
            else:
                show_diff(case["name"] + (f" (rc={rc}: {err.strip()})" if rc else ""), got, want)
        print(f"templates: {ok}/{total} Qwen3 chat-template renderings equal to Jinja2")

        with open(os.path.join(HERE, "constructs.json"), encoding="utf-8") as f:
            constructs = json.load(f)
        cok = 0
        for k, c in enumerate(constructs):
            src = c["template"]
            mdir = os.path.join(tmp, f"m{k}")
            write_tiny_model(mdir, src)
            extra = c.get("extra", {})
            msgs = c.get("messages", [{"role": "user", "content": "hi"}])
            try:
                want = reference(src, {"bos_token": "<s>", "eos_token": "</s>"}, msgs, None, True, extra)
                want_err = None
            except Exception as e:  # the template raises: zmlx must fail too
                want, want_err = None, str(e)
            rc, got, err = run_zmlx(zmlx, mdir, tmp, msgs, None, True, extra)
            if c.get("unsupported"):  # zmlx lacks it: must be an error naming it and its line
                good = rc != 0 and "unsupported construct" in err and "line " in err
            elif want_err is not None:
                good = rc != 0
            else:
                good = rc == 0 and got == want
            if good:
                cok += 1
            else:
                show_diff(f"construct #{k} {src[:80]!r}" + (f" (rc={rc}: {err.strip()})" if rc else ""), got,
                          want if want_err is None else f"<error: {want_err}>")
        print(f"templates: {cok}/{len(constructs)} construct templates equal to Jinja2")
    sys.exit(0 if ok == total and cok == len(constructs) else 1)


if __name__ == "__main__":
    main()
