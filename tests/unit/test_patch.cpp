// The patch layer: family defaults, env/flag control, report and log format,
// and the bar that matters: patched logits bit-identical to unpatched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "zmlx/core/error.h"
#include "zmlx/gen/generator.h"
#include "zmlx/models/model.h"
#include "zmlx/patch/patch.h"
#include "zmlx/synth/synth.h"
#include "model_test_helpers.h"
#include "test_helpers.h"

namespace zmlx {
namespace {

namespace fs = std::filesystem;

std::string synth(const std::string& name, uint64_t seed, std::vector<std::pair<std::string, std::string>> sets = {},
                  int bits = 4, int group = 64) {
  return test::synth_temp("qwen3_moe", "patch_" + name, seed, std::move(sets), bits, group);
}

std::vector<int32_t> prompt(size_t n, int64_t vocab) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 7919 + 13) % uint64_t(vocab)));
  return ids;
}

patch::PatchOptions on() {
  patch::PatchOptions o;
  o.enabled = true;
  o.quiet = true;
  return o;
}

TEST(Patch, FusedLogitsAreBitIdenticalAcrossSeedsShapesAndPromptLengths) {
  auto be = make_cpu_backend();
  struct Cfg {
    std::string name;
    uint64_t seed;
    std::vector<std::pair<std::string, std::string>> sets;
    int bits, group;
  };
  const std::vector<Cfg> cfgs = {
      {"tiny_s1", 1, {}, 4, 64},
      {"tiny_s2", 2, {{"mlp_only_layers", "[2]"}}, 4, 64},
      {"tiny_8bit", 3, {}, 8, 32},
      {"tiny_g128", 4, {{"moe_intermediate_size", "128"}}, 4, 128},
      // real widths (hidden 2048, 128 experts of 768, top-8), two layers
      {"wide", 5, {{"hidden_size", "2048"}, {"num_hidden_layers", "2"}, {"num_attention_heads", "32"},
                   {"num_key_value_heads", "4"}, {"head_dim", "128"}, {"num_experts", "128"},
                   {"num_experts_per_tok", "8"}, {"moe_intermediate_size", "768"}, {"vocab_size", "4096"}}, 4, 64},
  };
  for (auto& c : cfgs) {
    auto m = load_model(synth(c.name, c.seed, c.sets, c.bits, c.group), *be);
    for (size_t n : {size_t(1), size_t(7), size_t(300)}) {
      if (c.name == "wide" && n == 300) continue;  // keeps the suite fast; 7 tokens already prefill
      const auto ids = prompt(n, m->config().vocab_size);
      const auto base = test::prefill_then_greedy_logits(*m, *be, ids);
      auto rep = patch::patch(*m, on());
      ASSERT_GT(rep.total(), 0);
      const auto fused = test::prefill_then_greedy_logits(*m, *be, ids);
      ASSERT_EQ(patch::unpatch(*m), rep.total());
      ASSERT_EQ(base.size(), fused.size());
      ASSERT_TRUE(std::memcmp(base.data(), fused.data(), base.size() * 4) == 0)
          << c.name << " prompt " << n << ": patched logits differ";
    }
  }
}

TEST(Patch, DisabledMeansNothingPatched) {
  auto be = make_cpu_backend();
  auto m = load_model(synth("off", 1), *be);
  patch::PatchOptions o;  // enabled = false (EXO_ZMLX unset)
  auto rep = patch::patch(*m, o);
  EXPECT_FALSE(rep.enabled);
  EXPECT_EQ(rep.total(), 0);
  for (auto* slot : m->feed_forwards()) EXPECT_EQ((*slot)->kind(), "moe");
}

TEST(Patch, CountsReportAndLogShape) {
  auto be = make_cpu_backend();
  auto m = load_model(synth("counts", 1, {{"mlp_only_layers", "[0]"}}), *be);
  patch::PatchOptions o = on();
  o.quiet = false;
  testing::internal::CaptureStderr();
  auto rep = patch::patch(*m, o);
  const std::string log = testing::internal::GetCapturedStderr();
  EXPECT_EQ(rep.counts_str(), "{'swiglu_mlp': 1, 'moe_mlp': 3}");
  EXPECT_NE(log.find("[zmlx] Applying fused-kernel patches (distributed=False, parallelism=none)..."), std::string::npos)
      << log;
  EXPECT_NE(log.find("[zmlx] Patched 4 modules in "), std::string::npos) << log;
  EXPECT_NE(log.find("s: {'swiglu_mlp': 1, 'moe_mlp': 3}"), std::string::npos) << log;
  EXPECT_EQ(m->layer_kinds()[0], "attention+fused:swiglu_mlp");
  EXPECT_EQ(m->layer_kinds()[1], "attention+fused:moe_mlp");
}

TEST(Patch, PatternsExcludeAndUnknownNames) {
  auto be = make_cpu_backend();
  auto m = load_model(synth("sel", 1, {{"mlp_only_layers", "[0]"}}), *be);
  auto o = on();
  o.patterns = std::vector<std::string>{"swiglu_mlp"};
  EXPECT_EQ(patch::patch(*m, o).counts_str(), "{'swiglu_mlp': 1}");
  patch::unpatch(*m);
  o = on();
  o.exclude = {"moe_mlp"};
  auto rep = patch::patch(*m, o);
  EXPECT_EQ(rep.counts_str(), "{'swiglu_mlp': 1}");
  ASSERT_EQ(rep.excluded.size(), 1u);
  EXPECT_EQ(rep.excluded[0].first, "moe_mlp");
  patch::unpatch(*m);
  try {
    patch::check_pattern_names({"moe_mlp", "warp_drive"});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("warp_drive"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("known: swiglu_mlp, moe_mlp"), std::string::npos);  // lists the known ones
  }
  EXPECT_TRUE(patch::parse_pattern_list("none").empty());
  EXPECT_EQ(patch::parse_pattern_list(" moe_mlp , swiglu_mlp").size(), 2u);
}

TEST(Patch, EnvironmentVariablesAsInTheSeed) {
  test::ScopedEnv enabled("EXO_ZMLX", "1");
  test::ScopedEnv verbose("EXO_ZMLX_VERBOSE", "1");
  test::ScopedEnv patterns("EXO_ZMLX_PATTERNS", "moe_mlp");
  test::ScopedEnv exclude("EXO_ZMLX_EXCLUDE", "swiglu_mlp");
  auto o = patch::PatchOptions::from_env();
  EXPECT_TRUE(o.enabled);
  EXPECT_TRUE(o.verbose);
  ASSERT_TRUE(o.patterns.has_value());
  EXPECT_EQ(*o.patterns, std::vector<std::string>{"moe_mlp"});
  EXPECT_EQ(o.exclude, std::vector<std::string>{"swiglu_mlp"});
  enabled.set("0");
  EXPECT_FALSE(patch::PatchOptions::from_env().enabled);
  patterns.set("bogus");
  EXPECT_THROW(patch::PatchOptions::from_env(), Error);
  for (auto* v : {&enabled, &verbose, &patterns, &exclude}) v->set(nullptr);  // the defaults, checked last
  EXPECT_FALSE(patch::PatchOptions::from_env().enabled);
}

TEST(Patch, FamilyTable) {
  EXPECT_EQ(patch::family_policy("qwen3_moe").defaults, (std::vector<std::string>{"swiglu_mlp", "moe_mlp"}));
  EXPECT_TRUE(patch::family_policy("llama").defaults.empty());
  EXPECT_FALSE(patch::family_policy("llama").exclusions.empty());  // with a reason
  EXPECT_TRUE(patch::family_policy("mamba9").defaults.empty());   // unknown: safe no-op
}

}  // namespace
}  // namespace zmlx

namespace zmlx {
namespace {

TEST(Patch, DenseQwen3RunsUnpatchedByDefaultAndFusesWhenAsked) {
  auto be = make_cpu_backend();
  synth::SynthOptions so;
  so.arch = "qwen3";
  so.out = (fs::temp_directory_path() / ("zmlx_patch_dense_" + std::to_string(::getpid()))).string();
  fs::remove_all(so.out);
  auto m = load_model(synth::synth_model(so), *be);
  EXPECT_EQ(m->family(), "qwen3");
  for (auto& k : m->layer_kinds()) EXPECT_EQ(k, "attention+swiglu_mlp");
  auto rep = patch::patch(*m, on());
  EXPECT_EQ(rep.total(), 0);
  ASSERT_EQ(rep.excluded.size(), 1u);
  EXPECT_EQ(rep.excluded[0].first, "swiglu_mlp");
  const auto ids = prompt(9, m->config().vocab_size);
  const auto base = test::prefill_then_greedy_logits(*m, *be, ids);
  auto o = on();
  o.patterns = std::vector<std::string>{"swiglu_mlp"};
  EXPECT_EQ(patch::patch(*m, o).counts_str(), "{'swiglu_mlp': 4}");
  const auto fused = test::prefill_then_greedy_logits(*m, *be, ids);
  ASSERT_EQ(base.size(), fused.size());
  EXPECT_TRUE(std::memcmp(base.data(), fused.data(), base.size() * 4) == 0);
}

}  // namespace
}  // namespace zmlx
