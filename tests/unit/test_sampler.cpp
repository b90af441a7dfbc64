#include <gtest/gtest.h>

#include <map>

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
  EXPECT_EQ(s.sample({2.0f, 1.5f}, {0}), 1);  // 2.0/2 = 1.0 < 1.5
  EXPECT_EQ(s.sample({2.0f, 1.5f}, {}), 0);
}

TEST(Sampler, RejectsBadOptions) {
  SamplerOptions o;
  o.top_p = 0.f;
  EXPECT_THROW(Sampler{o}, Error);
  o = {};
  o.temperature = -1.f;
  EXPECT_THROW(Sampler{o}, Error);
}

}  // namespace
}  // namespace zmlx
