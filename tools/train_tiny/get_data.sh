#!/usr/bin/env bash
# Builds the training corpus of the shipped tiny model (models-shipped/zmlx-tiny-moe) from English text that
# Debian packages carry:
#   fortunes, fortunes-min   fortune cookies (quotes, jokes, short prose), /usr/share/games/fortunes
#   debian-reference-en      the Debian Reference (plain-text edition), prose paragraphs only
# Output: tools/train_tiny/data/corpus.txt (git-ignored): documents separated by a line holding only "%".
# Deterministic: files are read in sorted order; the same package versions give the same bytes (sha256 printed).
#   bash tools/train_tiny/get_data.sh            # installs the packages with apt-get if missing (needs root)
set -euo pipefail
cd "$(dirname "$0")"
PKGS=(fortunes fortunes-min debian-reference-en)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
mkdir -p data
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Package} ${Version}\n' "$p"; done > data/packages.txt
python3 - <<'PY'
import glob, gzip, hashlib, os, re, unicodedata

docs = []

def clean(t: str) -> str:
    t = unicodedata.normalize("NFC", t).replace("\t", "    ").replace("\r", "")
    lines = [l.rstrip() for l in t.split("\n")]
    t = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", t)

# 1. fortunes: every cookie file (not the .dat indexes, not the .u8 duplicates, not off/ = rot13)
n_f = 0
for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
    if path.endswith((".dat", ".u8")) or os.path.isdir(path) or os.path.islink(path):
        continue
    raw = open(path, "rb").read().decode("utf-8", errors="replace")
    for cookie in re.split(r"\n%\n", raw):
        c = clean(cookie)
        if 20 <= len(c) <= 2000 and "\ufffd" not in c:
            docs.append(c)
            n_f += 1

# 2. Debian Reference: keep paragraphs that read as prose (mostly letters, a full sentence, no table art)
n_d = 0
raw = gzip.open("/usr/share/debian-reference/debian-reference.en.txt.gz", "rb").read().decode("utf-8", "replace")
for para in re.split(r"\n\s*\n", raw):
    p = " ".join(l.strip() for l in para.split("\n") if l.strip())
    if len(p) < 80 or len(p) > 3000 or "\ufffd" in p:
        continue
    letters = sum(ch.isalpha() or ch == " " for ch in p)
    if letters / len(p) < 0.85 or not p.endswith((".", ":", "?", "!")) or "|" in p or "http" in p:
        continue
    docs.append(clean(p))
    n_d += 1

# dedupe, keep first occurrence (sorted file order is the document order)
seen, out = set(), []
for d in docs:
    if d not in seen:
        seen.add(d)
        out.append(d)
text = "\n%\n".join(out) + "\n"
open("data/corpus.txt", "w", encoding="utf-8").write(text)
b = text.encode("utf-8")
print(f"corpus: {len(out)} documents ({n_f} fortunes, {n_d} Debian Reference paragraphs before dedupe), "
      f"{len(b) / 1e6:.2f} MB, sha256 {hashlib.sha256(b).hexdigest()}")
PY
ls -l data/
