// zmlx bench MODEL: prefill and decode throughput (median, min, max over
// runs) and peak memory. Greedy decoding of a fixed pseudo-random prompt,
// or sampled (--temp and the filters, a fixed seed); EOS does not stop a
// run, so every run decodes the same number of tokens.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"
#include "zmlx/core/error.h"
#include "zmlx/gen/generator.h"

namespace zmlx::cli {
namespace {

struct BenchArgs {
  ModelArgs model;
  int prompt_tokens = 512, gen_tokens = 128, runs = 5, warmup = 1;
  int prefill_chunk = 0;  // 0: the backend's choice
  bool json = false;
  SamplerOptions sampling;
};

struct Stats {
  double median, min, max;
};
Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

int run(const BenchArgs& a) {
  LoadedModel m = load(a.model, false);
  const int64_t V = m.model->config().vocab_size;
  std::vector<int32_t> prompt(static_cast<size_t>(a.prompt_tokens));
  uint64_t s = 12345;
  for (auto& id : prompt) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    id = int32_t((s >> 33) % uint64_t(V));
  }
  GenerateOptions opt;
  opt.max_tokens = a.gen_tokens;  // no EOS ids: always the full length
  opt.sampling = a.sampling;
  opt.prefill_chunk = prefill_pass(*m.model, *m.backend, a.prefill_chunk);
  std::vector<double> pre, dec;
  for (int r = 0; r < a.warmup + a.runs; ++r) {
    GenerateResult g = generate(*m.model, *m.backend, nullptr, prompt, opt);
    if (r < a.warmup) continue;
    pre.push_back(g.prefill_tps());
    dec.push_back(g.decode_tps());
    if (m.leader()) std::fprintf(stderr, "[zmlx] run %d: prefill %.2f tok/s, decode %.2f tok/s\n", r - a.warmup + 1, pre.back(),
                 dec.back());
  }
  Stats p = stats(pre), d = stats(dec);
  uint64_t per_token = 0;
  for (auto& w : m.model->weight_summaries()) per_token += w.bytes_per_token;
  const double rss = double(peak_rss_bytes());
  if (!m.leader()) return 0;
  if (a.json) {
    nlohmann::json j = {{"model", m.dir}, {"family", m.model->family()}, {"backend", m.backend->name()},
                        {"parallel", m.model->placement().describe()},
                        {"prompt_tokens", a.prompt_tokens}, {"gen_tokens", a.gen_tokens}, {"runs", a.runs},
                        {"prefill_chunk", opt.prefill_chunk},
                        {"sampling", {{"temperature", a.sampling.temperature}, {"top_k", a.sampling.top_k},
                                      {"top_p", a.sampling.top_p}, {"min_p", a.sampling.min_p},
                                      {"repetition_penalty", a.sampling.repetition_penalty},
                                      {"frequency_penalty", a.sampling.frequency_penalty},
                                      {"presence_penalty", a.sampling.presence_penalty},
                                      {"seed", a.sampling.seed}}},
                        {"prefill_tps", {{"median", p.median}, {"min", p.min}, {"max", p.max}}},
                        {"decode_tps", {{"median", d.median}, {"min", d.min}, {"max", d.max}}},
                        {"bytes_per_token", per_token},
                        {"decode_gbps", d.median * double(per_token) / 1e9},
                        {"peak_rss_bytes", uint64_t(rss)},
                        {"peak_device_bytes", m.backend->peak_device_bytes()}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("model    %s (%s) on %s\n", m.dir.c_str(), m.model->family().c_str(), m.backend->name().c_str());
    std::printf("prefill  %d tokens: %.2f tok/s median (min %.2f, max %.2f)\n", a.prompt_tokens, p.median, p.min, p.max);
    std::printf("decode   %d tokens: %.2f tok/s median (min %.2f, max %.2f)\n", a.gen_tokens, d.median, d.min, d.max);
    std::printf("traffic  %s per token -> %.1f GB/s at the median decode rate\n", human_bytes(double(per_token)).c_str(),
                d.median * double(per_token) / 1e9);
    std::printf("memory   peak RSS %s", human_bytes(rss).c_str());
    if (m.backend->peak_device_bytes() > 0)
      std::printf(", GPU %s (weights + buffers)", human_bytes(double(m.backend->peak_device_bytes())).c_str());
    std::printf("\n");
  }
  return 0;
}

ZMLX_COMMAND("bench", "Measure prefill and decode throughput", [](CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  add_model_args(app, a->model);
  app.add_option("--prompt-tokens", a->prompt_tokens)->check(CLI::Range(1, 1 << 20));
  app.add_option("--gen-tokens", a->gen_tokens)->check(CLI::Range(2, 1 << 20));
  app.add_option("--prefill-chunk", a->prefill_chunk, "prompt tokens per forward pass (0: the backend's choice: up to 8192 on a GPU, 512 on the CPU; on a GPU at most 65535 / experts a token)")->check(CLI::Range(0, 65535));
  app.add_option("--runs", a->runs)->check(CLI::Range(1, 1000));
  app.add_option("--warmup", a->warmup, "untimed runs first")->check(CLI::Range(0, 100));
  app.add_flag("--json", a->json);
  app.add_option("--temp", a->sampling.temperature, "sampling temperature (0 = greedy)")->check(CLI::Range(0.f, 100.f));
  app.add_option("--top-k", a->sampling.top_k, "top-k filtering (0 = off)")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", a->sampling.top_p, "nucleus filtering (1 = off)")->check(CLI::Range(0.f, 1.f));
  app.add_option("--min-p", a->sampling.min_p, "min-p filtering (0 = off)")->check(CLI::Range(0.f, 1.f));
  app.add_option("--repeat-penalty", a->sampling.repetition_penalty, "repetition penalty (1 = off)");
  app.add_option("--frequency-penalty", a->sampling.frequency_penalty, "frequency penalty (0 = off)");
  app.add_option("--presence-penalty", a->sampling.presence_penalty, "presence penalty (0 = off)");
  app.add_option("--seed", a->sampling.seed, "random seed of the sampled runs");
  return [a] { return run(*a); };
});

}  // namespace
}  // namespace zmlx::cli
