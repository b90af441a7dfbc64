// Token sampling from logits: greedy, or temperature with top-k, top-p and
// min-p filtering, plus a repetition penalty. The random stream is a
// seeded mt19937_64, so the same seed gives the same tokens.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace zmlx {

struct SamplerOptions {
  float temperature = 0.f;        // 0: greedy (argmax)
  int top_k = 0;                  // 0: off
  float top_p = 1.f;              // 1: off
  float min_p = 0.f;              // 0: off
  float repetition_penalty = 1.f; // 1: off (mlx-lm semantics)
  int repetition_context = 20;    // how many recent tokens the penalty sees
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& o);
  // `history` = prompt + generated ids so far (for the repetition penalty).
  int32_t sample(std::vector<float> logits, const std::vector<int32_t>& history);
  const SamplerOptions& options() const { return o_; }

 private:
  SamplerOptions o_;
  std::mt19937_64 rng_;
};

// argmax with ties broken towards the lower id.
int32_t argmax(const float* logits, int64_t n);

}  // namespace zmlx
