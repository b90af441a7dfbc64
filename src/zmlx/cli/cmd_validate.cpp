// zmlx validate MODEL: token-by-token fidelity of the patched model against
// the unpatched one, plus throughput of both (the seed's validate report).
// One load; the runs alternate baseline / patched via patch() and unpatch(),
// so both see the same machine state. Greedy decoding, raw prompt. Fidelity
// comes from one untimed pass per config that copies every step's logits
// to the host; the timed runs after it copy nothing (that pass had been
// timed run 1, whose per-step copies made it the slowest of every three and
// let one other slow run decide the median).
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/gen/generator.h"
#include "zmlx/text/prompt_prefix.h"

namespace zmlx::cli {
namespace {

const char* kDefaultPrompt =
    "Explain the key differences between TCP and UDP protocols, including their use cases, reliability guarantees, "
    "and performance characteristics. Be thorough and precise.";

struct ValidateArgs {
  ModelArgs model;
  int max_tokens = 128, runs = 5;
  std::string prompt = kDefaultPrompt;
  bool json = false;
};

struct Side {
  std::vector<double> prefill, decode;
  std::vector<int32_t> tokens;              // the fidelity pass
  std::vector<std::vector<float>> logits;   // the fidelity pass, every step
  uint64_t peak_rss = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int run(ValidateArgs& a) {
  // Load unpatched; patching is driven explicitly below.
  ModelArgs base = a.model;
  base.patch = 0;
  patch::PatchOptions popt = patch_options(a.model);
  popt.enabled = true;
  LoadedModel m = load(base, true);
  const std::string& family = m.model->config().model_type;
  const std::vector<int32_t> prompt = m.tokenizer->encode(text::with_raw_prompt_prefix(family, a.prompt));
  ZMLX_CHECK(!prompt.empty(), "validate: the prompt encodes to no tokens");
  const std::vector<int32_t> warm = m.tokenizer->encode(text::with_raw_prompt_prefix(family, "Hello"));

  GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  for (int32_t id : m.model->config().eos_token_ids) opt.eos_ids.push_back(id);
  GenerateOptions warm_opt = opt;
  warm_opt.max_tokens = 5;

  const bool lead = m.leader();
  if (!a.json && lead) fmt::print("\n{}\n  Patching {}\n{}\n", std::string(60, '='), m.dir, std::string(60, '='));
  patch::PatchReport report = patch::patch(*m.model, popt);
  patch::unpatch(*m.model);

  patch::PatchOptions quiet = popt;
  quiet.quiet = true;
  Side sides[2];
  const char* names[2] = {"Baseline", "Patched"};
  for (int s = 0; s < 2; ++s) {  // warm-up: 2 short generations per config
    if (s == 1) patch::patch(*m.model, quiet);
    for (int w = 0; w < 2; ++w) generate(*m.model, *m.backend, nullptr, warm.empty() ? prompt : warm, warm_opt);
    if (s == 1) patch::unpatch(*m.model);
  }
  for (int s = 0; s < 2; ++s) {  // fidelity: token ids and every logit, not timed
    if (s == 1) patch::patch(*m.model, quiet);
    GenerateOptions o = opt;
    o.on_logits = [&](const std::vector<float>& l) { sides[s].logits.push_back(l); };
    sides[s].tokens = generate(*m.model, *m.backend, nullptr, prompt, o).token_ids;
    if (s == 1) patch::unpatch(*m.model);
    if (!a.json && lead) fmt::print("  {:<8} fidelity pass: {} tokens, every logit kept (not timed)\n", names[s], sides[s].tokens.size());
  }
  for (int r = 0; r < a.runs; ++r)
    for (int s = 0; s < 2; ++s) {
      if (s == 1) patch::patch(*m.model, quiet);
      GenerateResult g = generate(*m.model, *m.backend, nullptr, prompt, opt);
      if (s == 1) patch::unpatch(*m.model);
      sides[s].prefill.push_back(g.prefill_tps());
      sides[s].decode.push_back(g.decode_tps());
      sides[s].peak_rss = std::max(sides[s].peak_rss, peak_rss_bytes());
      if (!a.json && lead)
        fmt::print("  {:<8} run {}/{} ...  prompt={:.1f} tok/s  gen={:.1f} tok/s  mem={:.2f} GB\n", names[s], r + 1,
                   a.runs, g.prefill_tps(), g.decode_tps(), double(peak_rss_bytes()) / 1e9);
    }

  // Fidelity: token ids of the fidelity pass, and every logit of every step.
  const auto& ta = sides[0].tokens;
  const auto& tb = sides[1].tokens;
  const size_t total = std::max(ta.size(), tb.size()), common = std::min(ta.size(), tb.size());
  size_t matches = 0;
  long first_div = -1;
  for (size_t i = 0; i < common; ++i) {
    if (ta[i] == tb[i]) ++matches;
    else if (first_div < 0) first_div = long(i);
  }
  if (first_div < 0 && ta.size() != tb.size()) first_div = long(common);
  double max_diff = 0;
  size_t steps = std::min(sides[0].logits.size(), sides[1].logits.size());
  for (size_t i = 0; i < steps; ++i)
    for (size_t v = 0; v < sides[0].logits[i].size(); ++v)
      max_diff = std::max(max_diff, double(std::fabs(sides[0].logits[i][v] - sides[1].logits[i][v])));
  // Multi-process: the logits live on the logits rank; rank 0 reports.
  if (const dist::Placement& P = m.model->placement(); P.active()) {
    double msg[2] = {max_diff, double(steps)};
    P.comm->broadcast(msg, sizeof msg, P.logits_rank());
    max_diff = msg[0];
    steps = size_t(msg[1]);
    if (!lead) return 0;
  }
  const bool pass = total > 0 && matches == total && max_diff == 0.0 && report.total() > 0;
  const double pb = median(sides[0].prefill), pp = median(sides[1].prefill);
  const double db = median(sides[0].decode), dp = median(sides[1].decode);
  const double speedup = db > 0 ? dp / db : 0;

  if (a.json) {
    nlohmann::json j = {{"model", m.dir},
                        {"family", m.model->family()},
                        {"backend", m.backend->name()},
                        {"patterns", report.selected},
                        {"patched_modules", report.total()},
                        {"patch_counts", nlohmann::json::parse(report.json())["counts"]},
                        {"max_tokens", a.max_tokens},
                        {"runs", a.runs},
                        {"tokens_identical", matches},
                        {"tokens_total", total},
                        {"first_divergence", first_div},
                        {"max_abs_logit_diff", max_diff},
                        {"fidelity_pass", pass},
                        {"baseline", {{"prefill_tps", pb}, {"decode_tps", db}, {"peak_rss_bytes", sides[0].peak_rss}}},
                        {"patched", {{"prefill_tps", pp}, {"decode_tps", dp}, {"peak_rss_bytes", sides[1].peak_rss}}},
                        {"decode_speedup", speedup}};
    fmt::print("{}\n", j.dump(2));
    return pass ? 0 : 3;
  }
  fmt::print("\n{}\n  VALIDATION REPORT\n{}\n", std::string(60, '='), std::string(60, '='));
  if (m.model->placement().active()) fmt::print("  Parallel: {} over {} ranks\n", m.model->placement().describe(), m.model->placement().size);
  fmt::print("  Model:    {}\n  Backend:  {}\n  Patterns: [{}] ({} modules: {})\n  Tokens:   {} greedy (temp=0)\n\n", m.dir,
             m.backend->name(), fmt::join(report.selected, ", "), report.total(), report.counts_str(), a.max_tokens);
  fmt::print("  FIDELITY: {}/{} tokens identical  [{}]\n", matches, total, pass ? "PASS" : "FAIL");
  if (first_div >= 0) fmt::print("            First divergence at token {}\n", first_div);
  fmt::print("            max |dlogit| over {} steps: {:g}{}\n", steps, max_diff, max_diff == 0 ? " (bit-identical)" : "");
  if (report.total() == 0) fmt::print("            nothing was patched, so nothing was validated\n");
  if (total == 0) fmt::print("            the model generated no tokens for this prompt (EOS at once); try --prompt\n");
  fmt::print("\n  PERFORMANCE (median of {} runs, alternating):\n", a.runs);
  fmt::print("  {:<20} {:>14} {:>14} {:>10}\n", "Config", "Prompt tok/s", "Decode tok/s", "Peak Mem");
  fmt::print("  {}\n", std::string(60, '-'));
  fmt::print("  {:<20} {:>14.1f} {:>14.1f} {:>7.2f} GB\n", "Baseline", pb, db, double(sides[0].peak_rss) / 1e9);
  fmt::print("  {:<20} {:>14.1f} {:>14.1f} {:>7.2f} GB\n", "Patched", pp, dp, double(sides[1].peak_rss) / 1e9);
  fmt::print("  {:<20} {:>14} {:>13.3f}x\n", "Speedup", "", speedup);
  return pass ? 0 : 3;
}

ZMLX_COMMAND("validate", "Check patched vs unpatched fidelity token by token, and measure both", [](CLI::App& app) {
  auto a = std::make_shared<ValidateArgs>();
  add_model_args(app, a->model);
  app.add_option("--max-tokens", a->max_tokens)->check(CLI::Range(1, 1 << 16));
  app.add_option("--runs", a->runs)->check(CLI::Range(1, 100));
  app.add_option("--prompt", a->prompt, "raw prompt (no chat template)");
  app.add_flag("--json", a->json);
  return [a] { return run(*a); };
});

}  // namespace
}  // namespace zmlx::cli
