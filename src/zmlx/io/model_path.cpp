// Offline model lookup: a directory, or a repo id in the Hugging Face cache.
// Cache layout (huggingface_hub):
//   <hub>/models--ORG--NAME/refs/main            text file holding a revision hash
//   <hub>/models--ORG--NAME/snapshots/<rev>/...  the files of that revision
#include "zmlx/io/model_path.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "zmlx/core/error.h"

namespace zmlx::io {

namespace fs = std::filesystem;

namespace {

bool has_config(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / "config.json", ec);
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string trim(std::string s) {
  auto ws = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  while (!s.empty() && ws(s.back())) s.pop_back();
  size_t i = 0;
  while (i < s.size() && ws(s[i])) ++i;
  return s.substr(i);
}

// The snapshot of a cached repo directory (models--ORG--NAME): refs/main's
// revision when that snapshot has config.json, else the most recently
// modified snapshot that has one. Appends every path tried to `looked`.
std::string snapshot_of(const fs::path& repo_dir, std::vector<std::string>* looked) {
  std::error_code ec;
  const fs::path ref = repo_dir / "refs" / "main";
  if (fs::is_regular_file(ref, ec)) {
    std::ifstream f(ref);
    std::string rev((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    rev = trim(rev);
    if (!rev.empty() && rev.find('/') == std::string::npos && rev != "..") {
      fs::path snap = repo_dir / "snapshots" / rev;
      if (looked) looked->push_back((snap / "config.json").string() + " (refs/main)");
      if (has_config(snap)) return snap.string();
    }
  } else if (looked) {
    looked->push_back(ref.string() + " (absent)");
  }
  const fs::path snaps = repo_dir / "snapshots";
  fs::path best;
  fs::file_time_type best_time{};
  bool any = false;
  if (fs::is_directory(snaps, ec)) {
    for (auto& e : fs::directory_iterator(snaps, ec)) {
      if (!e.is_directory(ec)) continue;
      if (looked) looked->push_back((e.path() / "config.json").string());
      if (!has_config(e.path())) continue;
      auto t = fs::last_write_time(e.path(), ec);
      if (ec) continue;
      if (!any || t > best_time || (t == best_time && e.path() > best)) {
        best = e.path();
        best_time = t;
        any = true;
      }
    }
  } else if (looked) {
    looked->push_back(snaps.string() + " (absent)");
  }
  return any ? best.string() : std::string();
}

bool looks_like_repo_id(const std::string& s) {
  auto slash = s.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 >= s.size()) return false;
  if (s.find('/', slash + 1) != std::string::npos) return false;
  if (s[0] == '.' || s[0] == '~') return false;
  return true;
}

}  // namespace

std::string hf_hub_dir() {
  // Same precedence as huggingface_hub: HF_HUB_CACHE, then $HF_HOME/hub,
  // then $XDG_CACHE_HOME/huggingface/hub, then ~/.cache/huggingface/hub.
  std::string v = env("HF_HUB_CACHE");
  if (!v.empty()) return v;
  v = env("HF_HOME");
  if (!v.empty()) return (fs::path(v) / "hub").string();
  v = env("XDG_CACHE_HOME");
  if (!v.empty()) return (fs::path(v) / "huggingface" / "hub").string();
  std::string home = env("HOME");
  if (home.empty()) home = ".";
  return (fs::path(home) / ".cache" / "huggingface" / "hub").string();
}

std::string resolve_model_path(const std::string& arg) {
  ZMLX_CHECK(!arg.empty(), "model path is empty");
  std::vector<std::string> looked;
  std::error_code ec;
  fs::path p(arg);
  if (fs::is_directory(p, ec)) {
    looked.push_back((p / "config.json").string());
    if (has_config(p)) return p.string();
    // A cache repo directory given directly (…/models--ORG--NAME).
    if (fs::is_directory(p / "snapshots", ec)) {
      std::string s = snapshot_of(p, &looked);
      if (!s.empty()) return s;
    }
  } else {
    looked.push_back(p.string() + " (not a directory)");
  }
  if (looks_like_repo_id(arg)) {
    std::string org = arg.substr(0, arg.find('/')), name = arg.substr(arg.find('/') + 1);
    fs::path repo_dir = fs::path(hf_hub_dir()) / ("models--" + org + "--" + name);
    if (fs::is_directory(repo_dir, ec)) {
      std::string s = snapshot_of(repo_dir, &looked);
      if (!s.empty()) return s;
    } else {
      looked.push_back(repo_dir.string() + " (absent)");
    }
  }
  std::string list;
  for (auto& l : looked) list += "\n  " + l;
  fail("model '{}' not found (no config.json; zmlx never downloads). Looked at:{}", arg, list);
}

std::vector<CachedModel> list_cached_models() {
  std::vector<CachedModel> out;
  std::error_code ec;
  fs::path hub(hf_hub_dir());
  if (!fs::is_directory(hub, ec)) return out;
  for (auto& e : fs::directory_iterator(hub, ec)) {
    std::string dn = e.path().filename().string();
    if (!e.is_directory(ec) || dn.rfind("models--", 0) != 0) continue;
    std::string rest = dn.substr(8);
    auto sep = rest.find("--");
    if (sep == std::string::npos) continue;
    std::string snap = snapshot_of(e.path(), nullptr);
    if (snap.empty()) continue;
    out.push_back({rest.substr(0, sep) + "/" + rest.substr(sep + 2), snap});
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.repo_id < b.repo_id; });
  return out;
}

std::string resolve_tokenizer_path(const std::string& arg) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(arg, ec) && fs::exists(fs::path(arg) / "tokenizer.json", ec)) return arg;
  return resolve_model_path(arg);
}

}  // namespace zmlx::io
