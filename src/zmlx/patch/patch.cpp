#include "zmlx/patch/patch.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>

#include "zmlx/core/error.h"
#include "zmlx/patch/fused_modules.h"

namespace zmlx::patch {

namespace {

std::string trim(std::string s) {
  const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

bool env_true(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return false;
  std::string s = trim(v);
  return !(s.empty() || s == "0" || s == "false" || s == "False" || s == "no");
}

// ---- safety rules shared by the patterns

std::optional<std::string> unsupported_weight(const Weight& w) {
  if (!w.quantized) return std::nullopt;  // dense bf16: the same kernels handle it
  if (!quant::supported(w.q))
    return fmt::format("{}: bits={} group_size={} not supported by the fused kernel", w.name, w.q.bits, w.q.group_size);
  return std::nullopt;
}

std::optional<std::string> gate_up_mismatch(const Weight& gate, const Weight& up, const Weight& down) {
  if (gate.rows != up.rows || gate.cols != up.cols || gate.experts != up.experts)
    return std::string("gate and up weights must have matching shapes");
  if (gate.quantized != up.quantized || (gate.quantized && (gate.q.bits != up.q.bits || gate.q.group_size != up.q.group_size)))
    return std::string("gate and up weights must share one quantization");
  if (down.cols != gate.rows) return fmt::format("down_proj takes {} features but gate produces {}", down.cols, gate.rows);
  for (const Weight* w : {&gate, &up, &down})
    if (auto r = unsupported_weight(*w)) return r;
  return std::nullopt;
}

template <typename... Args>
void say(const PatchOptions& o, fmt::format_string<Args...> f, Args&&... args) {
  if (!o.quiet) fmt::print(stderr, f, std::forward<Args>(args)...);
}

struct Context {
  const PatchOptions& options;
  std::string family;
};

struct Pattern {
  std::string name;
  std::function<bool(const FeedForward&)> matches;                      // structural match
  std::function<std::optional<std::string>(const FeedForward&, const Context&)> unsafe;  // safety rule
  std::function<std::unique_ptr<FeedForward>(std::unique_ptr<FeedForward>)> replace;
};

const std::vector<Pattern>& patterns() {
  static const std::vector<Pattern> p = {
      {"swiglu_mlp",
       [](const FeedForward& m) { return dynamic_cast<const SwigluMlp*>(&m) != nullptr; },
       [](const FeedForward& m, const Context&) {
         auto& s = static_cast<const SwigluMlp&>(m);
         return gate_up_mismatch(s.gate_proj, s.up_proj, s.down_proj);
       },
       [](std::unique_ptr<FeedForward> m) -> std::unique_ptr<FeedForward> {
         return std::make_unique<FusedSwiglu>(std::unique_ptr<SwigluMlp>(static_cast<SwigluMlp*>(m.release())));
       }},
      {"moe_mlp",
       [](const FeedForward& m) { return dynamic_cast<const MoeBlock*>(&m) != nullptr; },
       [](const FeedForward& m, const Context& ctx) -> std::optional<std::string> {
         auto& b = static_cast<const MoeBlock&>(m);
         if (b.top_k < 1 || b.top_k > b.gate_proj.experts) return fmt::format("top_k {} of {} experts", b.top_k, b.gate_proj.experts);
         if (auto r = gate_up_mismatch(b.gate_proj, b.up_proj, b.down_proj)) return r;
         if (b.shared_expert)
           if (auto r = gate_up_mismatch(b.shared_expert->gate_proj, b.shared_expert->up_proj, b.shared_expert->down_proj))
             return "shared expert: " + *r;
         (void)ctx;  // every parallelism keeps the fusion: each rank fuses its shard, then one all-reduce
         return std::nullopt;
       },
       [](std::unique_ptr<FeedForward> m) -> std::unique_ptr<FeedForward> {
         return std::make_unique<FusedMoe>(std::unique_ptr<MoeBlock>(static_cast<MoeBlock*>(m.release())));
       }},
  };
  return p;
}

const Pattern* find_pattern(const std::string& name) {
  for (auto& p : patterns())
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace

// ---- options

PatchOptions PatchOptions::from_env() {
  PatchOptions o;
  o.enabled = env_true("EXO_ZMLX");
  o.verbose = env_true("EXO_ZMLX_VERBOSE");
  if (const char* p = std::getenv("EXO_ZMLX_PATTERNS"); p && *p) {
    o.patterns = parse_pattern_list(p);
    check_pattern_names(*o.patterns);
  }
  if (const char* e = std::getenv("EXO_ZMLX_EXCLUDE"); e && *e) {
    o.exclude = parse_pattern_list(e);
    check_pattern_names(o.exclude);
  }
  return o;
}

std::vector<std::string> known_patterns() {
  std::vector<std::string> out;
  for (auto& p : patterns()) out.push_back(p.name);
  return out;
}

void check_pattern_names(const std::vector<std::string>& names) {
  for (auto& n : names)
    ZMLX_CHECK(find_pattern(n), "unknown patch pattern '{}' (known: {})", n, fmt::join(known_patterns(), ", "));
}

std::vector<std::string> parse_pattern_list(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string t = trim(s.substr(i, j - i));
    if (!t.empty()) out.push_back(t);
    i = j + 1;
  }
  if (out.size() == 1 && (out[0] == "none" || out[0] == "off" || out[0] == "no")) out.clear();
  return out;
}

// ---- the per-family table: the one place that says what each family gets

FamilyPolicy family_policy(const std::string& family) {
  if (family == "qwen3_moe" || family == "glm4_moe_lite" || family == "lfm2_moe")
    return {{"swiglu_mlp", "moe_mlp"}, {}};
  if (family == "qwen3" || family == "llama")
    return {{},
            {{"swiglu_mlp",
              "dense family: like the seed, other models are left untouched by default (opt in with "
              "EXO_ZMLX_PATTERNS=swiglu_mlp; the fused path is bit-identical)"}}};
  return {{}, {}};
}

// ---- report

int PatchReport::total() const {
  int n = 0;
  for (auto& [k, v] : counts) n += v;
  return n;
}

std::string PatchReport::counts_str() const {
  std::string s = "{";
  for (size_t i = 0; i < counts.size(); ++i) s += fmt::format("{}'{}': {}", i ? ", " : "", counts[i].first, counts[i].second);
  return s + "}";
}

std::string PatchReport::json() const {
  nlohmann::ordered_json j;
  j["enabled"] = enabled;
  j["family"] = family;
  j["patterns"] = selected;
  j["patched"] = total();
  j["counts"] = nlohmann::ordered_json::object();
  for (auto& [k, v] : counts) j["counts"][k] = v;
  j["excluded"] = nlohmann::ordered_json::array();
  for (auto& [p, r] : excluded) j["excluded"].push_back({{"pattern", p}, {"reason", r}});
  j["skipped"] = nlohmann::ordered_json::array();
  for (auto& s : skipped) j["skipped"].push_back({{"module", s.path}, {"pattern", s.pattern}, {"reason", s.reason}});
  j["seconds"] = seconds;
  return j.dump();
}

// ---- patch / unpatch

PatchReport patch(Model& model, const PatchOptions& o) {
  PatchReport rep;
  rep.family = model.family();
  rep.enabled = o.enabled;
  if (!o.enabled) return rep;
  const auto t0 = std::chrono::steady_clock::now();
  say(o, "[zmlx] Applying fused-kernel patches (distributed={}, parallelism={})...\n",
             o.distributed ? "True" : "False", o.parallelism);

  const FamilyPolicy policy = family_policy(rep.family);
  std::vector<std::string> selected;
  if (o.patterns) {
    check_pattern_names(*o.patterns);
    selected = *o.patterns;  // explicit patterns bypass the family defaults, as in the seed
  } else {
    selected = policy.defaults;
    for (auto& [p, reason] : policy.exclusions) rep.excluded.push_back({p, reason});
    if (selected.empty() && policy.exclusions.empty())
      say(o, "[zmlx] Family '{}' has no fusion patterns: nothing patched (safe no-op)\n", rep.family);
    else if (selected.empty())
      for (auto& [p, reason] : policy.exclusions)
        say(o, "[zmlx] Family '{}': {} not applied by default: {}\n", rep.family, p, reason);
  }
  check_pattern_names(o.exclude);
  for (auto& e : o.exclude) {
    auto it = std::find(selected.begin(), selected.end(), e);
    if (it != selected.end()) {
      selected.erase(it);
      rep.excluded.push_back({e, "excluded by EXO_ZMLX_EXCLUDE / --exclude"});
    }
  }
  rep.selected = selected;
  if (o.verbose)
    for (auto& [p, r] : rep.excluded) say(o, "[zmlx]   excluded {}: {}\n", p, r);

  const Context ctx{o, rep.family};
  for (std::unique_ptr<FeedForward>* slot : model.feed_forwards()) {
    FeedForward& m = **slot;
    if (dynamic_cast<PatchedModule*>(&m)) continue;  // already patched
    for (auto& name : selected) {
      const Pattern& p = *find_pattern(name);
      if (!p.matches(m)) continue;
      if (auto reason = p.unsafe(m, ctx)) {
        rep.skipped.push_back({m.path, p.name, *reason});
        if (o.verbose) say(o, "[zmlx]   skipped {} ({}): {}\n", m.path, p.name, *reason);
        break;
      }
      const std::string path = m.path;
      *slot = p.replace(std::move(*slot));
      rep.patched.push_back({path, p.name});
      auto it = std::find_if(rep.counts.begin(), rep.counts.end(), [&](auto& c) { return c.first == p.name; });
      if (it == rep.counts.end()) rep.counts.push_back({p.name, 1});
      else it->second++;
      if (o.verbose) say(o, "[zmlx]   {}: {}\n", path, p.name);
      break;  // first matching pattern wins
    }
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (o.placement.empty())
    say(o, "[zmlx] Patched {} modules in {:.2f}s: {}\n", rep.total(), rep.seconds, rep.counts_str());
  else
    say(o, "[zmlx] Patched {} modules in {:.2f}s: {} ({})\n", rep.total(), rep.seconds, rep.counts_str(), o.placement);
  if (!rep.skipped.empty() && !o.verbose)
    say(o, "[zmlx] Skipped {} modules (EXO_ZMLX_VERBOSE=1 lists them)\n", rep.skipped.size());
  return rep;
}

int unpatch(Model& model) {
  int n = 0;
  for (std::unique_ptr<FeedForward>* slot : model.feed_forwards())
    if (auto* pm = dynamic_cast<PatchedModule*>(slot->get())) {
      *slot = pm->release_original();
      ++n;
    }
  return n;
}

}  // namespace zmlx::patch
