// End to end on the CPU with tiny synthetic models: loading, determinism,
// prefill/decode consistency and clear errors for broken checkpoints.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "zmlx/core/error.h"
#include "zmlx/gen/decode_step.h"
#include "zmlx/gen/generator.h"
#include "zmlx/models/model.h"
#include "zmlx/synth/synth.h"
#include "model_test_helpers.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx {
namespace {

namespace fs = std::filesystem;

std::string tiny(const std::string& name, std::vector<std::pair<std::string, std::string>> sets = {}, int bits = 4,
                 int group = 64, int router_bits = 0) {
  return test::synth_temp("qwen3_moe", name, 3, std::move(sets), bits, group, router_bits);
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

TEST(Synth, SameSeedGivesIdenticalBytes) {
  std::string a = tiny("det_a"), b = tiny("det_b");
  for (auto& e : fs::directory_iterator(a)) {
    const auto name = e.path().filename();
    ASSERT_TRUE(fs::exists(fs::path(b) / name)) << name;
    EXPECT_EQ(slurp(e.path()), slurp(fs::path(b) / name)) << name;
  }
}

TEST(Model, PrefillInChunksEqualsOnePassBitForBit) {
  auto be = make_cpu_backend();
  auto m = load_model(tiny("chunks"), *be);
  std::vector<int32_t> ids;
  for (int i = 0; i < 23; ++i) ids.push_back((i * 37 + 11) % 2000);
  auto one = test::last_logits(*m, *be, ids, ids.size());
  auto steps = test::last_logits(*m, *be, ids, 1);
  auto mixed = test::last_logits(*m, *be, ids, 5);
  EXPECT_EQ(one, steps);
  EXPECT_EQ(one, mixed);
}

// GenerateOptions::prefill_chunk = 0 (the default) leaves the pass length to
// the backend: the CPU's is 512, an open length runs, and any pass length
// gives the CPU's tokens. (Which length a GPU picks, and that every rank of a
// parallel run takes rank 0's, is not checked here.)
TEST(Model, OpenPrefillPassRunsAndAnyPassGivesTheSameTokens) {
  auto be = make_cpu_backend();
  EXPECT_EQ(be->prefill_chunk(), 512);
  auto m = load_model(tiny("passes"), *be);
  std::vector<int32_t> ids;
  for (int i = 0; i < 600; ++i) ids.push_back((i * 37 + 11) % 2000);  // two passes of 512
  GenerateOptions o;
  o.max_tokens = 6;
  ASSERT_EQ(o.prefill_chunk, 0);
  const auto open = generate(*m, *be, nullptr, ids, o).token_ids;
  ASSERT_EQ(open.size(), 6u);
  for (int chunk : {1000, 512, 7}) {
    o.prefill_chunk = chunk;
    EXPECT_EQ(generate(*m, *be, nullptr, ids, o).token_ids, open) << "passes of " << chunk;
  }
  // The pass length actually used: the backend's when left open, else the
  // one asked for (the CPU has no per-call limit; the GPU's: CudaOps).
  EXPECT_EQ(prefill_pass(*m, *be, 0), 512);
  EXPECT_EQ(prefill_pass(*m, *be, 100), 100);
  EXPECT_EQ(prefill_pass(*m, *be, 65535), 65535);
}

TEST(Model, GreedyGenerationIsDeterministicAndPeaked) {
  auto be = make_cpu_backend();
  const std::string dir = tiny("greedy");
  auto m = load_model(dir, *be);
  const auto prompt = text::Tokenizer::from_dir(dir).encode("The quick brown fox");
  GenerateOptions o;
  o.max_tokens = 24;
  auto a = generate(*m, *be, nullptr, prompt, o);
  auto b = generate(*m, *be, nullptr, prompt, o);
  EXPECT_EQ(a.token_ids, b.token_ids);
  EXPECT_EQ(a.token_ids.size(), 24u);
  // Synthetic weights are scaled so greedy choices are clear-cut.
  auto l = test::last_logits(*m, *be, prompt, prompt.size());
  std::vector<float> s = l;
  std::sort(s.rbegin(), s.rend());
  EXPECT_GT(s[0] - s[1], 0.5f);
}

TEST(Model, QuantizationVariantsLoadAndRun) {
  auto be = make_cpu_backend();
  for (auto [bits, group] : {std::pair{8, 32}, std::pair{2, 128}, std::pair{4, 128}, std::pair{0, 64}}) {
    auto m = load_model(tiny("q" + std::to_string(bits) + "_" + std::to_string(group),
                             {{"moe_intermediate_size", std::to_string(group)}}, bits, group), *be);
    auto l = test::last_logits(*m, *be, {1, 2, 3}, 3);
    for (float v : l) ASSERT_TRUE(std::isfinite(v));
  }
  auto m = load_model(tiny("router8", {}, 4, 64, 8), *be);
  EXPECT_TRUE(std::isfinite(test::last_logits(*m, *be, {1, 2}, 2)[0]));
}

TEST(Model, DenseLayersFromMlpOnlyLayers) {
  auto be = make_cpu_backend();
  auto m = load_model(tiny("mlp_only", {{"mlp_only_layers", "[1]"}}), *be);
  auto kinds = m->layer_kinds();
  EXPECT_EQ(kinds[1], "attention+swiglu_mlp");
  EXPECT_EQ(kinds[0], "attention+moe");
}

void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    FAIL() << "expected zmlx::Error";
  } catch (const Error& e) {
    for (auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
  }
}

void edit_config(const std::string& dir, const std::function<void(nlohmann::json&)>& edit) {
  auto path = fs::path(dir) / "config.json";
  nlohmann::json j = nlohmann::json::parse(slurp(path));
  edit(j);
  std::ofstream(path) << j.dump();
}

TEST(ModelErrors, QuantizationMismatchNamesTheModule) {
  auto be = make_cpu_backend();
  std::string d = tiny("qmismatch");
  edit_config(d, [](nlohmann::json& j) { j["quantization"]["model.layers.1.mlp.gate"] = {{"group_size", 64}, {"bits", 8}}; });
  expect_error([&] { load_model(d, *be); }, {"model.layers.1.mlp.gate", "bits=8", "bits=4"});
}

TEST(ModelErrors, WrongShapesAndFields) {
  auto be = make_cpu_backend();
  std::string d = tiny("shape");
  edit_config(d, [](nlohmann::json& j) { j["moe_intermediate_size"] = 128; });
  expect_error([&] { load_model(d, *be); }, {"switch_mlp", "shape"});
  std::string d2 = tiny("unknown");
  edit_config(d2, [](nlohmann::json& j) { j["model_type"] = "mamba9"; });
  expect_error([&] { load_model(d2, *be); }, {"mamba9", "qwen3_moe"});
  std::string d3 = tiny("badfield");
  edit_config(d3, [](nlohmann::json& j) { j["num_experts"] = "many"; });
  expect_error([&] { load_model(d3, *be); }, {"config.json", "num_experts", "integer"});
  std::string d4 = tiny("heads");
  edit_config(d4, [](nlohmann::json& j) { j["num_key_value_heads"] = 3; });
  expect_error([&] { load_model(d4, *be); }, {"num_key_value_heads"});
}

TEST(ModelErrors, BadTokenIdIsAnErrorNotACrash) {
  auto be = make_cpu_backend();
  auto m = load_model(tiny("badid"), *be);
  Cache c = m->new_cache(*be);
  expect_error([&] { m->forward(*be, {1, 999999}, c); }, {"999999", "vocabulary"});
}

}  // namespace
}  // namespace zmlx

namespace zmlx {
namespace {
TEST(ModelConfigNames, AcceptsTransformers5NumLocalExperts) {
  auto be = make_cpu_backend();
  std::string d = tiny("local_experts");
  edit_config(d, [](nlohmann::json& j) {
    j["num_local_experts"] = j["num_experts"];
    j.erase("num_experts");
  });
  auto m = load_model(d, *be);
  EXPECT_EQ(m->layer_kinds().size(), 4u);
}
}  // namespace
}  // namespace zmlx

namespace zmlx {
namespace {

// decode_forward (the recorded-step entry point) computes exactly what
// forward does, advances the cache, and checks the token on the host (a
// replayed step runs no host checks).
TEST(DecodeStep, SameAsForwardAndChecksTheToken) {
  auto be = make_cpu_backend();
  auto m = load_model(test::synth_temp("qwen3_moe", "decode_step", 4), *be);
  const std::vector<int32_t> ids = {3, 99, 250, 7};
  Cache a = m->new_cache(*be), b = m->new_cache(*be);
  m->forward(*be, ids, a);
  m->forward(*be, ids, b);
  int32_t next = 11;
  for (int s = 0; s < 5; ++s) {
    const auto x = logits_to_host(*be, m->forward(*be, {next}, a), 0);
    const auto y = logits_to_host(*be, decode_forward(*m, *be, next, b), 0);
    ASSERT_EQ(x, y) << "step " << s;
    ASSERT_EQ(a.pos, b.pos);
    next = argmax(x.data(), int64_t(x.size()));
  }
  const int64_t V = m->config().vocab_size;
  EXPECT_THROW(decode_forward(*m, *be, int32_t(V), b), Error);
  EXPECT_THROW(decode_forward(*m, *be, -1, b), Error);
  EXPECT_EQ(a.pos, b.pos) << "a refused token must not advance the cache";

  // Chained greedy steps (the default, synchronous implementation): the
  // device-side token of each step feeds the next one.
  Cache c = m->new_cache(*be), d = m->new_cache(*be);
  m->forward(*be, ids, c);
  m->forward(*be, ids, d);
  int32_t tok = 11;
  decode_forward_chained(*m, *be, tok, c);
  for (int s = 0; s < 5; ++s) {
    const auto x = logits_to_host(*be, m->forward(*be, {tok}, d), 0);
    tok = argmax(x.data(), int64_t(x.size()));
    ASSERT_EQ(be->chained_token(c.pos - 1), tok) << "chained step " << s;
    decode_forward_chained(*m, *be, -1, c);
  }
  EXPECT_THROW(be->chained_token(c.pos), Error) << "no step ran at this position yet";
  Cache fresh = m->new_cache(*be);
  m->forward(*be, ids, fresh);
  EXPECT_THROW(decode_forward_chained(*m, *be, -1, fresh), Error) << "no chained step chose this position's token";
}

}  // namespace
}  // namespace zmlx
