// Helpers shared by the model-level tests: synthetic models in a temp dir and
// the two logit traces the fidelity tests compare.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "zmlx/gen/generator.h"
#include "zmlx/models/model.h"
#include "zmlx/synth/synth.h"

namespace zmlx::test {

// The synth_temp directories of this process, removed when it exits (a full
// suite writes ~700 MB of them; left behind they filled the shared disk).
struct SynthTempDirs {
  std::vector<std::string> dirs;
  ~SynthTempDirs() {
    std::error_code ec;
    for (auto& d : dirs) std::filesystem::remove_all(d, ec);
  }
};
inline SynthTempDirs& synth_temp_dirs() {
  static SynthTempDirs d;
  return d;
}

// Writes a synthetic model of `arch` to a fresh per-process temp dir.
inline std::string synth_temp(const std::string& arch, const std::string& name, uint64_t seed = 3,
                              std::vector<std::pair<std::string, std::string>> sets = {}, int bits = 4,
                              int group = 64, int router_bits = 0) {
  synth::SynthOptions o;
  o.arch = arch;
  o.out = (std::filesystem::temp_directory_path() / ("zmlx_test_" + name + "_" + std::to_string(::getpid()))).string();
  std::filesystem::remove_all(o.out);
  auto& dirs = synth_temp_dirs().dirs;
  if (std::find(dirs.begin(), dirs.end(), o.out) == dirs.end()) dirs.push_back(o.out);
  o.seed = seed;
  o.sets = std::move(sets);
  o.bits = bits;
  o.group_size = group;
  o.router_bits = router_bits;
  return synth::synth_model(o);
}

// n token ids spread over the vocabulary (the same for every run).
inline std::vector<int32_t> ids_of(size_t n, int64_t vocab) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 7919 + 13) % uint64_t(vocab)));
  return ids;
}

// n greedy tokens after `prompt`, from a fresh cache.
inline std::vector<int32_t> greedy(Model& m, Backend& be, const std::vector<int32_t>& prompt, int n) {
  Cache c = m.new_cache(be);
  auto v = logits_to_host(be, m.forward(be, prompt, c), 0);
  std::vector<int32_t> out;
  for (int s = 0; s < n; ++s) {
    out.push_back(argmax(v.data(), int64_t(v.size())));
    v = logits_to_host(be, m.forward(be, {out.back()}, c), 0);
  }
  return out;
}

// Logits of the last token after feeding `ids` in pieces of `chunk`.
inline std::vector<float> last_logits(Model& m, Backend& be, const std::vector<int32_t>& ids, size_t chunk) {
  Cache c = m.new_cache(be);
  Tensor l;
  for (size_t i = 0; i < ids.size(); i += chunk)
    l = m.forward(be, std::vector<int32_t>(ids.begin() + i, ids.begin() + std::min(ids.size(), i + chunk)), c);
  return logits_to_host(be, l, 0);
}

// Every logit of a teacher-forced pass over `ids`, then of `steps` greedy decode steps.
inline std::vector<float> prefill_then_greedy_logits(Model& m, Backend& be, const std::vector<int32_t>& ids,
                                                     int steps = 6) {
  Cache c = m.new_cache(be);
  std::vector<float> all;
  Tensor l = m.forward(be, ids, c, /*all_logits=*/true);
  for (int64_t r = 0; r < l.rows(); ++r) {
    auto v = logits_to_host(be, l, r);
    all.insert(all.end(), v.begin(), v.end());
  }
  const int64_t V = m.config().vocab_size;
  int32_t next = argmax(all.data() + all.size() - V, V);
  for (int s = 0; s < steps; ++s) {
    auto v = logits_to_host(be, m.forward(be, {next}, c), 0);
    all.insert(all.end(), v.begin(), v.end());
    next = argmax(v.data(), int64_t(v.size()));
  }
  return all;
}

}  // namespace zmlx::test
