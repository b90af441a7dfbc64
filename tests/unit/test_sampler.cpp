#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <random>

#include "zmlx/core/error.h"
#include "zmlx/gen/sampler.h"

namespace zmlx {
namespace {

TEST(Sampler, GreedyIsArgmaxWithLowIdTieBreak) {
  Sampler s({});
  EXPECT_EQ(s.sample({0.1f, 3.f, -1.f, 3.f}, {}), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDiffers) {
  std::vector<float> l(50);
  for (size_t i = 0; i < l.size(); ++i) l[i] = float(i % 7) * 0.3f;
  auto run = [&](uint64_t seed) {
    SamplerOptions o;
    o.temperature = 1.0f;
    o.seed = seed;
    Sampler s(o);
    std::vector<int32_t> out;
    for (int i = 0; i < 40; ++i) out.push_back(s.sample(l, {}));
    return out;
  };
  EXPECT_EQ(run(7), run(7));
  EXPECT_NE(run(7), run(8));
}

TEST(Sampler, TopKOneIsGreedy) {
  SamplerOptions o;
  o.temperature = 2.0f;
  o.top_k = 1;
  Sampler s(o);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample({1.f, 0.5f, 2.f, 1.9f}, {}), 2);
}

TEST(Sampler, TopPAndMinPRestrictTheCandidates) {
  // probs at T=1: softmax(log p) = p, so the filters act on known numbers.
  std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  SamplerOptions o;
  o.temperature = 1.0f;
  o.top_p = 0.75f;  // keeps {0, 1}
  Sampler s(o);
  std::map<int, int> seen;
  for (int i = 0; i < 2000; ++i) seen[s.sample(l, {})]++;
  EXPECT_EQ(seen.count(2) + seen.count(3), 0u);
  EXPECT_GT(seen[0], seen[1]);
  SamplerOptions m;
  m.temperature = 1.0f;
  m.min_p = 0.2f;  // threshold 0.1: drops id 3 only
  Sampler s2(m);
  std::map<int, int> seen2;
  for (int i = 0; i < 4000; ++i) seen2[s2.sample(l, {})]++;
  EXPECT_EQ(seen2.count(3), 0u);
  EXPECT_GT(seen2[2], 300);
}

TEST(Sampler, RepetitionPenaltyDemotesSeenTokens) {
  SamplerOptions o;
  o.repetition_penalty = 2.0f;
  Sampler s(o);
  EXPECT_EQ(s.sample({2.0f, 1.5f}, std::vector<int32_t>{0}), 1);  // 2.0/2 = 1.0 < 1.5
  EXPECT_EQ(s.sample({2.0f, 1.5f}, {}), 0);
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountTheOutput) {
  // Greedy with penalties: token 0 leads by 1.0; after it was output twice,
  // frequency 0.3 (x2) + presence 0.5 take 1.1 off: token 1 wins.
  SamplerOptions o;
  o.frequency_penalty = 0.3f;
  o.presence_penalty = 0.5f;
  Sampler s(o);
  EXPECT_FALSE(s.greedy());
  const std::vector<float> l = {3.0f, 2.0f, 0.5f};
  const std::vector<int32_t> once = {0}, twice = {0, 2, 0};
  EXPECT_EQ(s.sample(l, {}, once), 0);   // 3.0 - 0.3 - 0.5 = 2.2 > 2.0
  EXPECT_EQ(s.sample(l, {}, twice), 1);  // 3.0 - 0.6 - 0.5 = 1.9 < 2.0
  EXPECT_EQ(s.sample(l, {}, {}), 0);
  // A negative presence penalty favours what was said.
  o.frequency_penalty = 0.f;
  o.presence_penalty = -1.5f;
  Sampler f(o);
  EXPECT_EQ(f.sample(l, {}, std::vector<int32_t>{2}), 0);  // 0.5 + 1.5 = 2.0 < 3.0
  EXPECT_EQ(f.sample({2.0f, 2.4f, 1.0f}, {}, std::vector<int32_t>{0}), 0);  // 3.5 > 2.4
}

TEST(Sampler, RejectsBadOptions) {
  SamplerOptions o;
  o.top_p = 0.f;
  EXPECT_THROW(Sampler{o}, Error);
  o = {};
  o.temperature = -1.f;
  EXPECT_THROW(Sampler{o}, Error);
}

TEST(SamplingMath, OrderKeyFollowsTheLogitsAndFoldsNanAndNegativeZero) {
  using sampling::order_key;
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> up = {-inf, -3e38f, -1.5f, -1e-30f, 0.f, 1e-30f, 2.f, 3e38f, inf};
  for (size_t i = 1; i < up.size(); ++i) EXPECT_LT(order_key(up[i - 1]), order_key(up[i])) << up[i];
  EXPECT_EQ(order_key(-0.f), order_key(0.f));
  EXPECT_EQ(order_key(std::nanf("")), order_key(-inf));
  for (float x : up) EXPECT_EQ(sampling::key_logit(order_key(x)), x);
}

TEST(SamplingMath, ExpWeightIsExpInUnitsOfTwoToTheMinus44) {
  EXPECT_EQ(sampling::exp_weight(0.f), uint64_t(1) << 44);
  EXPECT_EQ(sampling::exp_weight(-30.5f), 0u);
  EXPECT_EQ(sampling::exp_weight(std::nanf("")), 0u);
  EXPECT_EQ(sampling::exp_weight(-std::numeric_limits<float>::infinity()), 0u);
  for (float z = -30.f; z <= 0.f; z += 0.0137f) {
    const double want = std::exp(double(z)) * std::ldexp(1.0, 44);
    const double got = double(sampling::exp_weight(z));
    EXPECT_NEAR(got, want, want * 3e-7 + 1.0) << "z = " << z;
  }
}

// Random logits of several kinds: smooth, coarse (many exact ties, as bf16
// logits have), and with NaN, infinities and signed zeros mixed in.
std::vector<float> random_logits(std::mt19937& g, int64_t V, int kind) {
  std::normal_distribution<float> nd(0.f, kind == 0 ? 3.f : 8.f);
  std::vector<float> l(static_cast<size_t>(V));
  for (auto& x : l) {
    x = nd(g);
    if (kind >= 1) x = std::round(x * 4.f) / 4.f;  // coarse: ties
  }
  if (kind == 2 && V > 8) {
    l[size_t(g() % V)] = std::nanf("");
    l[size_t(g() % V)] = -std::numeric_limits<float>::infinity();
    l[size_t(g() % V)] = -0.f;
    l[size_t(g() % V)] = 0.f;
  }
  if (kind == 3) std::fill(l.begin(), l.end(), 1.25f);  // all equal
  return l;
}

TEST(Sampler, FastSamplerMatchesTheSortedDefinition) {
  std::mt19937 g(20261128);
  const int64_t sizes[] = {1, 2, 7, 300, 5000, 40000};
  int checked = 0;
  for (int64_t V : sizes)
    for (int kind = 0; kind < 4; ++kind)
      for (int c = 0; c < 6; ++c) {
        const std::vector<float> l = random_logits(g, V, kind);
        SamplerOptions o;
        const float temps[] = {0.f, 0.05f, 0.7f, 1.f, 4.f};
        o.temperature = temps[g() % 5];
        o.top_k = c % 3 == 0 ? int(g() % 50) : 0;
        o.top_p = c % 2 == 0 ? 0.05f + 0.95f * float(g() % 1000) / 1000.f : 1.f;
        o.min_p = c % 4 == 1 ? 0.01f * float(g() % 50) : 0.f;
        o.repetition_penalty = c % 3 == 2 ? 1.7f : 1.f;
        o.frequency_penalty = c % 2 == 1 ? 0.4f : 0.f;
        o.presence_penalty = c == 5 ? -0.7f : 0.f;
        o.seed = g();
        std::vector<int32_t> window, output;
        for (int i = 0; i < 12; ++i) window.push_back(int32_t(g() % uint32_t(V)));
        for (int i = 0; i < 30; ++i) output.push_back(int32_t(g() % uint32_t(std::min<int64_t>(V, 9))));  // repeats
        for (uint64_t draw = 0; draw < 8; ++draw) {
          const int32_t want = sample_logits_reference(l, o, window, output, draw);
          ASSERT_EQ(sample_logits(l, o, window, output, draw), want)
              << "V " << V << " kind " << kind << " T " << o.temperature << " top_k " << o.top_k << " top_p "
              << o.top_p << " min_p " << o.min_p << " draw " << draw;
          ASSERT_GE(want, 0);
          ASSERT_LT(want, V);
          ++checked;
        }
      }
  EXPECT_EQ(checked, 6 * 4 * 6 * 8);
}

TEST(Sampler, FrequenciesFollowTheSoftmax) {
  // 8 tokens at T = 0.8: each token's count over 40,000 draws within 5
  // standard deviations of the softmax's expectation.
  const std::vector<float> l = {0.3f, -1.f, 2.f, 1.1f, 0.f, -3.f, 1.9f, 0.5f};
  SamplerOptions o;
  o.temperature = 0.8f;
  o.seed = 99;
  std::vector<double> p(l.size());
  double sum = 0;
  for (size_t i = 0; i < l.size(); ++i) sum += p[i] = std::exp((l[i] - 2.0) / 0.8);
  const int N = 40000;
  std::vector<int> seen(l.size());
  Sampler s(o);
  for (int i = 0; i < N; ++i) seen[size_t(s.sample(l, {}))]++;
  for (size_t i = 0; i < l.size(); ++i) {
    const double q = p[i] / sum, mean = N * q, sd = std::sqrt(N * q * (1 - q));
    EXPECT_NEAR(seen[i], mean, 5 * sd + 1) << "token " << i;
  }
}

TEST(Sampler, EachDrawIsAPureFunctionOfSeedAndIndex) {
  std::vector<float> l(64);
  for (size_t i = 0; i < l.size(); ++i) l[i] = float(i % 9) * 0.4f;
  SamplerOptions o;
  o.temperature = 1.f;
  o.seed = 5;
  Sampler s(o);
  for (uint64_t j = 0; j < 30; ++j) {
    EXPECT_EQ(s.draws(), j);
    const int32_t t = s.sample(l, {});
    EXPECT_EQ(t, sample_logits(l, o, {}, {}, j));
  }
}

TEST(Sampler, RepetitionWindowIsTheLastContextTokens) {
  SamplerOptions o;
  o.repetition_penalty = 1.3f;
  o.repetition_context = 3;
  const std::vector<int32_t> h = {4, 5, 6, 7, 8};
  EXPECT_EQ(repetition_window(o, h), (std::vector<int32_t>{6, 7, 8}));
  o.repetition_penalty = 1.f;
  EXPECT_TRUE(repetition_window(o, h).empty());
}

}  // namespace
}  // namespace zmlx
