#include "zmlx/gen/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

#include "zmlx/core/error.h"

namespace zmlx {

int32_t argmax(const float* l, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (l[i] > l[best]) best = i;
  return int32_t(best);
}

Sampler::Sampler(const SamplerOptions& o) : o_(o), rng_(o.seed) {
  ZMLX_CHECK(o.temperature >= 0.f && std::isfinite(o.temperature), "temperature must be >= 0, got {}", o.temperature);
  ZMLX_CHECK(o.top_p > 0.f && o.top_p <= 1.f, "top_p must be in (0, 1], got {}", o.top_p);
  ZMLX_CHECK(o.min_p >= 0.f && o.min_p < 1.f, "min_p must be in [0, 1), got {}", o.min_p);
  ZMLX_CHECK(o.top_k >= 0, "top_k must be >= 0, got {}", o.top_k);
  ZMLX_CHECK(o.repetition_penalty > 0.f, "repetition penalty must be > 0, got {}", o.repetition_penalty);
}

int32_t Sampler::sample(std::vector<float> logits, const std::vector<int32_t>& history) {
  const int64_t V = int64_t(logits.size());
  if (o_.repetition_penalty != 1.f && !history.empty()) {
    std::unordered_set<int32_t> seen;
    const size_t from = history.size() > size_t(o_.repetition_context) ? history.size() - size_t(o_.repetition_context) : 0;
    for (size_t i = from; i < history.size(); ++i) seen.insert(history[i]);
    for (int32_t id : seen)
      if (id >= 0 && id < V) {
        float& l = logits[size_t(id)];
        l = l < 0 ? l * o_.repetition_penalty : l / o_.repetition_penalty;
      }
  }
  if (o_.temperature == 0.f) return argmax(logits.data(), V);

  // Candidates sorted by logit, highest first (ties: lower id first).
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
  };
  int64_t keep = V;
  if (o_.top_k > 0 && o_.top_k < V) {
    keep = o_.top_k;
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), by_logit);
  } else {
    std::sort(idx.begin(), idx.end(), by_logit);
  }
  idx.resize(size_t(keep));
  const float mx = logits[size_t(idx[0])];
  std::vector<double> p(idx.size());
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) sum += (p[i] = std::exp(double(logits[size_t(idx[i])] - mx) / o_.temperature));
  for (auto& v : p) v /= sum;
  size_t n = p.size();
  if (o_.min_p > 0.f) {  // drop tokens below min_p × the top probability
    const double thr = double(o_.min_p) * p[0];
    while (n > 1 && p[n - 1] < thr) --n;
  }
  if (o_.top_p < 1.f) {  // smallest prefix whose mass reaches top_p
    double c = 0;
    size_t m = 0;
    while (m < n) {
      c += p[m++];
      if (c >= double(o_.top_p)) break;
    }
    n = std::max<size_t>(m, 1);
  }
  double mass = 0;
  for (size_t i = 0; i < n; ++i) mass += p[i];
  // 53 random bits -> uniform double in [0, 1): the same on every platform.
  const double u = double(rng_() >> 11) * (1.0 / 9007199254740992.0) * mass;
  double c = 0;
  for (size_t i = 0; i < n; ++i) {
    c += p[i];
    if (u < c) return idx[i];
  }
  return idx[n - 1];
}

}  // namespace zmlx
