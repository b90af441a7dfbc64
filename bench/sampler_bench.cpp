// The host sampler's time a token at a real vocabulary (Qwen3's 151,936
// logits, bf16 values as a model produces them): sample_logits (bins; what
// generation runs) against sample_logits_reference (every candidate
// sorted, the definition; about what the sampler cost before the bins).
//   build/sampler_bench [V] [tokens]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "zmlx/core/dtype.h"
#include "zmlx/gen/sampler.h"

using namespace zmlx;

int main(int argc, char** argv) {
  const int64_t V = argc > 1 ? std::atoll(argv[1]) : 151936;
  const int tokens = argc > 2 ? std::atoi(argv[2]) : 50;
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.f, 3.f);
  std::vector<float> l(static_cast<size_t>(V));
  for (auto& x : l) x = bf16_to_f32(f32_to_bf16_bits(d(g)));  // bf16 values, as logits are
  struct Case {
    const char* name;
    float temp, top_p, min_p, penalty, frequency;
    int top_k;
  };
  const Case cases[] = {{"T 1", 1.f, 1.f, 0.f, 1.f, 0.f, 0},
                        {"T 0.7, top-p 0.95", 0.7f, 0.95f, 0.f, 1.f, 0.f, 0},
                        {"T 0.6, top-k 20, top-p 0.95", 0.6f, 0.95f, 0.f, 1.f, 0.f, 20},
                        {"T 1, min-p 0.05, penalty 1.1", 1.f, 1.f, 0.05f, 1.1f, 0.f, 0},
                        {"T 1, frequency penalty 0.5", 1.f, 1.f, 0.f, 1.f, 0.5f, 0}};
  std::vector<int32_t> window;
  for (int i = 0; i < 20; ++i) window.push_back(int32_t(g() % uint64_t(V)));
  std::printf("V = %lld, %d tokens a case, ms a token\n", (long long)V, tokens);
  for (const Case& c : cases) {
    SamplerOptions o;
    o.temperature = c.temp, o.top_p = c.top_p, o.min_p = c.min_p, o.repetition_penalty = c.penalty, o.top_k = c.top_k;
    o.frequency_penalty = c.frequency;
    o.seed = 7;
    const std::vector<int32_t> seen = repetition_window(o, window);
    auto time = [&](auto&& fn) {
      const auto t0 = std::chrono::steady_clock::now();
      int64_t sum = 0;
      for (int j = 0; j < tokens; ++j) sum += fn(uint64_t(j));
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      return std::make_pair(ms / tokens, sum);
    };
    // The output so far: the window's 20 ids (the frequency penalty counts them).
    const auto fast = time([&](uint64_t j) { return sample_logits(l, o, seen, window, j); });
    const auto ref = time([&](uint64_t j) { return sample_logits_reference(l, o, seen, window, j); });
    std::printf("  %-32s sample_logits %7.3f   reference (sort all) %7.3f   %s\n", c.name, fast.first, ref.first,
                fast.second == ref.second ? "same tokens" : "TOKENS DIFFER");
    if (fast.second != ref.second) return 1;
  }
  return 0;
}
