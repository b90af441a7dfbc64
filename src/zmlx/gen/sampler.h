// Token sampling from logits: greedy, or temperature with top-k, top-p and
// min-p filtering, plus a repetition penalty.
//
// The algorithm, the same on the host and on a GPU (arithmetic in
// gen/sampling_math.h; the CUDA backend's sampler is tested against
// sample_logits_reference below):
//   1. The repetition penalty applies once to each distinct id among the
//      last `repetition_context` tokens of the history (prompt + output);
//      then OpenAI's frequency and presence penalties subtract
//      count * frequency + presence from a token the output holds count > 0
//      times (penalize_count).
//   2. Temperature 0: the highest logit, ties to the lower id.
//   3. Candidates in order: logit descending, ties to the lower id.
//      Weights w_i = exp((l_i - max) / T) as integers (exp_weight).
//   4. keep = top_k (0: all); S = the weight of the first `keep`.
//   5. min_p cuts where (l - max) / T < log(min_p), i.e. p < min_p * p_max.
//   6. top_p keeps the shortest prefix whose weight reaches ceil(top_p * S).
//   7. n = the shortest of those (at least 1); M = the weight of the first n.
//   8. r = draw's random bits scaled to [0, M); the token is the first
//      candidate at which the running weight exceeds r.
// Draw j of a seed is a pure function of (seed, j), so a device can take
// over the stream mid-generation (Backend::begin_sampling).
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "zmlx/gen/sampling_math.h"

namespace zmlx {

struct SamplerOptions {
  float temperature = 0.f;        // 0: greedy (argmax)
  int top_k = 0;                  // 0: off
  float top_p = 1.f;              // 1: off
  float min_p = 0.f;              // 0: off
  float repetition_penalty = 1.f; // 1: off (mlx-lm semantics)
  int repetition_context = 20;    // how many recent tokens the penalty sees
  float frequency_penalty = 0.f;  // 0: off (OpenAI semantics, over the output)
  float presence_penalty = 0.f;   // 0: off
  uint64_t seed = 0;
};

// Throws a clear error for an option out of range.
void check_sampler_options(const SamplerOptions& o);

// The options as the arithmetic (and a device) reads them.
sampling::Params sampling_params(const SamplerOptions& o);

// The ids the repetition penalty sees: the last repetition_context entries
// of `history` (empty when the penalty is off).
std::vector<int32_t> repetition_window(const SamplerOptions& o, std::span<const int32_t> history);

// One token from `logits` by the algorithm above: draw `draw` of o.seed,
// `window` the repetition penalty's ids, `output` the tokens generated so
// far (the frequency and presence penalties count them). Work O(V) plus
// sorting the few candidates that share the top 16 bits of a logit with a
// cut or the pick.
int32_t sample_logits(std::span<const float> logits, const SamplerOptions& o, std::span<const int32_t> window,
                      std::span<const int32_t> output, uint64_t draw);
// The same by sorting every candidate: the definition, for tests.
int32_t sample_logits_reference(std::span<const float> logits, const SamplerOptions& o,
                                std::span<const int32_t> window, std::span<const int32_t> output, uint64_t draw);
// Both by the options as sampling_params gives them.
int32_t sample_logits(std::span<const float> logits, const sampling::Params& p, std::span<const int32_t> window,
                      std::span<const int32_t> output, uint64_t draw);
int32_t sample_logits_reference(std::span<const float> logits, const sampling::Params& p,
                                std::span<const int32_t> window, std::span<const int32_t> output, uint64_t draw);

// A seeded stream of samples: draw 0, 1, 2, ... of options().seed.
class Sampler {
 public:
  explicit Sampler(const SamplerOptions& o);
  // `history` = prompt + generated ids so far (the repetition penalty's
  // window comes from it); `output` = the generated ids alone.
  int32_t sample(const std::vector<float>& logits, std::span<const int32_t> history,
                 std::span<const int32_t> output = {});
  const SamplerOptions& options() const { return o_; }
  // Plain argmax: temperature 0 and no penalty.
  bool greedy() const {
    return o_.temperature <= 0.f && o_.repetition_penalty == 1.f && o_.frequency_penalty == 0.f &&
           o_.presence_penalty == 0.f;
  }
  // How many draws the stream has used. next_draw() is the index of the
  // next sample's draw, and uses it when the sample is random (T > 0;
  // greedy picks take none), so a caller sampling elsewhere (a device)
  // keeps the stream in step.
  uint64_t draws() const { return draws_; }
  uint64_t next_draw() { return o_.temperature > 0.f ? draws_++ : draws_; }

 private:
  SamplerOptions o_;
  uint64_t draws_ = 0;
};

// argmax with ties broken towards the lower id.
int32_t argmax(const float* logits, int64_t n);

}  // namespace zmlx
