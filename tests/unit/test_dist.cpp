// dist/placement: pipeline layer splits and --layers parsing; device choice of
// ranks; glm4_moe_lite under pipeline / tensor parallel over in-process ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <thread>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/dist/placement.h"
#include "zmlx/gen/generator.h"
#include "zmlx/gen/sampler.h"
#include "zmlx/ops/backend.h"
#include "test_helpers.h"
#include "thread_ranks_test_helpers.h"

using namespace zmlx;
using Ranges = std::vector<std::pair<int64_t, int64_t>>;

TEST(DistPlacement, SplitByBytesBalancesAndCovers) {
  EXPECT_EQ(dist::split_layers_by_bytes({10, 10, 10, 10}, 2), (Ranges{{0, 2}, {2, 4}}));
  EXPECT_EQ(dist::split_layers_by_bytes({30, 10, 10, 10}, 2), (Ranges{{0, 1}, {1, 4}}));
  EXPECT_EQ(dist::split_layers_by_bytes({1, 1, 1, 1, 1, 100}, 2), (Ranges{{0, 5}, {5, 6}}));
  // Every stage gets at least one layer even when one layer dominates.
  EXPECT_EQ(dist::split_layers_by_bytes({100, 1, 1}, 3), (Ranges{{0, 1}, {1, 2}, {2, 3}}));
  const auto r = dist::split_layers_by_bytes(std::vector<uint64_t>(48, 7), 4);
  ASSERT_EQ(r.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(r[i], (std::pair<int64_t, int64_t>{int64_t(12 * i), int64_t(12 * i + 12)}));
  EXPECT_THROW(dist::split_layers_by_bytes({1, 1}, 3), Error);
}

TEST(DistPlacement, ParseLayerRanges) {
  EXPECT_EQ(dist::parse_layer_ranges("0-23,24-47", 48, 2), (Ranges{{0, 24}, {24, 48}}));
  EXPECT_EQ(dist::parse_layer_ranges("0,1-3", 4, 2), (Ranges{{0, 1}, {1, 4}}));
  EXPECT_THROW(dist::parse_layer_ranges("0-23,25-47", 48, 2), Error);  // gap
  EXPECT_THROW(dist::parse_layer_ranges("0-23,24-46", 48, 2), Error);  // does not reach the end
  EXPECT_THROW(dist::parse_layer_ranges("0-47", 48, 2), Error);        // one range for two ranks
  EXPECT_THROW(dist::parse_layer_ranges("0-x,1-2", 3, 2), Error);
  EXPECT_THROW(dist::parse_layer_ranges("3-1,2-4", 5, 2), Error);
}

TEST(DistPlacement, Describe) {
  dist::Placement p;
  EXPECT_EQ(p.describe(), "single process");
  EXPECT_TRUE(p.owns_layer(5) && p.first_stage() && p.last_stage());
  p.mode = dist::Mode::Pipeline;
  p.rank = 1;
  p.size = 2;
  p.stages = {{0, 24}, {24, 48}};
  EXPECT_EQ(p.describe(), "rank 1/2 layers 24-47");
  EXPECT_FALSE(p.owns_layer(3));
  EXPECT_TRUE(p.owns_layer(24));
  EXPECT_EQ(p.logits_rank(), 1);
  EXPECT_EQ(p.tp_count(), 1);
  p.mode = dist::Mode::Tensor;
  EXPECT_EQ(p.describe(), "rank 1/2 tensor shard 2/2");
  EXPECT_EQ(p.tp_index(), 1);
  EXPECT_EQ(p.logits_rank(), 0);
}

TEST(DistPlacement, DescribeNamesTheDevice) {
  dist::Placement p;
  p.mode = dist::Mode::Tensor;
  p.rank = 1;
  p.size = 2;
  p.devices = {"cuda:0 (GPU A)", "cuda:1 (GPU B)"};
  EXPECT_EQ(p.describe(), "rank 1/2 tensor shard 2/2 on cuda:1 (GPU B)");
}

TEST(DistPlacement, LocalRankFromTheLauncher) {
  test::ScopedEnv ompi("OMPI_COMM_WORLD_LOCAL_RANK", nullptr);
  test::ScopedEnv mpich("MPI_LOCALRANKID", nullptr);
  test::ScopedEnv slurm("SLURM_LOCALID", nullptr);
  EXPECT_EQ(dist::local_rank(5), 5);  // no launcher variable: the world rank
  ompi.set("1");
  EXPECT_EQ(dist::local_rank(5), 1);
}

namespace {
// One rank: broadcasts are no-ops, as MPI's with a single rank.
class SoloComm final : public dist::Communicator {
 public:
  std::string kind() const override { return "solo"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::vector<std::string>& hosts() const override { return hosts_; }
  void allreduce_sum(void*, int64_t, DType) override {}
  void send(const void*, size_t, int) override {}
  void recv(void*, size_t, int) override {}
  void broadcast(void*, size_t, int, bool) override {}
  void barrier(double) override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }

 private:
  std::vector<std::string> hosts_{"here"};
};
}  // namespace

TEST(DistPlacement, CpuRanksGetTheCpuBackendAndListTheirDevice) {
  dist::Placement p;
  p.mode = dist::Mode::Pipeline;
  p.comm = std::make_shared<SoloComm>();
  EXPECT_EQ(p.comm->all_gather_string("cpu x"), std::vector<std::string>{"cpu x"});
  auto be = make_backend_for_ranks("cpu", p);
  EXPECT_EQ(be->device(), Device::CPU);
  EXPECT_EQ(be->native_stream(), nullptr);
  EXPECT_EQ(p.comm->kind(), "solo");  // CPU ranks keep the MPI-style transport
  ASSERT_EQ(p.devices.size(), 1u);
  EXPECT_EQ(p.devices[0], be->name());
}

// ---- glm4_moe_lite over two in-process ranks (thread_ranks_test_helpers.h)

namespace {

// The tiny GLM with moe_intermediate_size 128 (two quantization groups of 64,
// so experts and the shared expert split in two), as tests/e2e/mpi.sh uses.
std::string synth_glm_splittable(const std::string& name, std::vector<std::pair<std::string, std::string>> sets = {}) {
  sets.push_back({"moe_intermediate_size", "128"});
  return test::synth_temp("glm4_moe_lite", "dist_" + name, 4, std::move(sets));
}

std::vector<int32_t> prompt_ids(int64_t vocab) {
  std::vector<int32_t> ids;
  for (int32_t i = 0; i < 11; ++i) ids.push_back(int32_t((i * 7919 + 5) % vocab));
  return ids;
}

double rel_l2(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    num += double(got[i] - want[i]) * (got[i] - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

const WeightSummary* find_summary(const Model& m, const std::string& path) {
  for (auto& s : m.weight_summaries())
    if (s.path == path) return &s;
  return nullptr;
}

dist::Placement placement(dist::Mode mode, int rank, int size, const std::string& layers = "") {
  dist::Placement p;
  p.mode = mode;
  p.rank = rank;
  p.size = size;
  p.layers_arg = layers;
  return p;  // no communicator: loading alone never talks to the other ranks
}

}  // namespace

TEST(DistGlm, PipelineLogitsAreBitIdenticalToOneProcess) {
  const std::string dir = synth_glm_splittable("glm_pipe");
  auto be = make_cpu_backend();
  auto ref = load_model(dir, *be);
  const auto ids = prompt_ids(ref->config().vocab_size);
  // Teacher-forced prompt (expanded MLA) then greedy steps (absorbed MLA).
  const auto want = test::prefill_then_greedy_logits(*ref, *be, ids, 6);
  for (const std::string layers : {"", "0-0,1-3"}) {
    for (bool patched : {false, true}) {
      const auto got = test::ranks_prefill_then_greedy_logits(dir, dist::Mode::Pipeline, 2, ids, 6, patched, layers);
      EXPECT_TRUE(got == want) << "layers '" << layers << "' patched " << patched << ": rel L2 " << rel_l2(got, want);
    }
  }
}

// Every sampler option reaches the rank that samples: a pipeline's last
// rank generates with the frequency and presence penalties as one process
// does (they were once left out of the request message).
TEST(DistGlm, PipelineSampledGenerationMatchesOneProcess) {
  const std::string dir = synth_glm_splittable("glm_pipe_sampled");
  auto be = make_cpu_backend();
  auto ref = load_model(dir, *be);
  const auto ids = prompt_ids(ref->config().vocab_size);
  GenerateOptions o;
  o.max_tokens = 12;
  // Penalties alone (T 0: not greedy()). The synthetic logits are peaked and
  // rarely repeat, so a large negative presence penalty makes output tokens
  // come back: a visible effect.
  o.sampling.temperature = 0.f;
  o.sampling.frequency_penalty = 0.5f;
  o.sampling.presence_penalty = -50.f;
  const std::vector<int32_t> want = generate(*ref, *be, nullptr, ids, o).token_ids;
  GenerateOptions plain = o;
  plain.sampling.frequency_penalty = plain.sampling.presence_penalty = 0.f;
  EXPECT_NE(generate(*ref, *be, nullptr, ids, plain).token_ids, want) << "the penalties changed nothing here";
  test::ThreadRanksHub hub(2);
  std::vector<std::vector<int32_t>> got(2);
  std::vector<std::exception_ptr> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        dist::Placement p = placement(dist::Mode::Pipeline, r, 2);
        p.comm = std::make_shared<test::ThreadRanksComm>(hub, r);
        auto rb = make_cpu_backend();
        auto m = load_model(dir, *rb, p);
        got[size_t(r)] = generate(*m, *rb, nullptr, ids, r == 0 ? o : GenerateOptions{}).token_ids;
      } catch (...) {
        errors[size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  EXPECT_EQ(got[0], want);
  EXPECT_EQ(got[1], want);
}

TEST(DistGlm, PipelineStageLoadsOnlyItsLayers) {
  const std::string dir = synth_glm_splittable("glm_stage");
  auto be = make_cpu_backend();
  auto first = load_model(dir, *be, placement(dist::Mode::Pipeline, 0, 2, "0-0,1-3"));
  auto last = load_model(dir, *be, placement(dist::Mode::Pipeline, 1, 2, "0-0,1-3"));
  EXPECT_EQ(first->layer_kinds(),
            (std::vector<std::string>{"mla+swiglu_mlp", "(another rank)", "(another rank)", "(another rank)"}));
  EXPECT_EQ(last->layer_kinds(), (std::vector<std::string>{"(another rank)", "mla+moe", "mla+moe", "mla+moe"}));
  // The embedding only on the first stage, lm_head only on the last (untied).
  EXPECT_TRUE(find_summary(*first, "model.embed_tokens") && !find_summary(*first, "lm_head"));
  EXPECT_TRUE(!find_summary(*last, "model.embed_tokens") && find_summary(*last, "lm_head"));
  EXPECT_FALSE(find_summary(*first, "model.layers.1.self_attn.o_proj"));
  EXPECT_FALSE(find_summary(*last, "model.layers.0.self_attn.o_proj"));
  // A latent cache only for the stage's own layers.
  const Cache c = last->new_cache(*be);
  ASSERT_EQ(c.kv.size(), 4u);
  EXPECT_TRUE(c.kv[0].k.empty());
  EXPECT_FALSE(c.kv[1].k.empty());
}

TEST(DistGlm, TensorShardHoldsHalfTheHeadsAndIntermediates) {
  const std::string dir = synth_glm_splittable("glm_shard");
  auto be = make_cpu_backend();
  auto m = load_model(dir, *be, placement(dist::Mode::Tensor, 1, 2));
  auto shape = [&](const std::string& path) {
    const WeightSummary* s = find_summary(*m, path);
    return s ? s->shape : std::vector<int64_t>{};
  };
  using S = std::vector<int64_t>;
  const std::string a = "model.layers.1.self_attn";
  // tiny: 4 heads of (64 nope + 32 rope), v 64, kv_lora 64, q_lora 64, hidden 128
  EXPECT_EQ(shape(a + ".q_b_proj"), (S{2 * 96, 64}));
  EXPECT_EQ(shape(a + ".embed_q"), (S{2, 64, 64}));
  EXPECT_EQ(shape(a + ".unembed_out"), (S{2, 64, 64}));
  EXPECT_EQ(shape(a + ".o_proj"), (S{128, 2 * 64}));
  // Shared by every head: replicated.
  EXPECT_EQ(shape(a + ".q_a_proj"), (S{64, 128}));
  EXPECT_EQ(shape(a + ".kv_a_proj_with_mqa"), (S{64 + 32, 128}));
  // Dense layer 0 (intermediate 256), experts and shared expert (128): halves.
  EXPECT_EQ(shape("model.layers.0.mlp.gate_proj"), (S{128, 128}));
  EXPECT_EQ(shape("model.layers.0.mlp.down_proj"), (S{128, 128}));
  EXPECT_EQ(shape("model.layers.1.mlp.switch_mlp.up_proj"), (S{8, 64, 128}));
  EXPECT_EQ(shape("model.layers.1.mlp.switch_mlp.down_proj"), (S{8, 128, 64}));
  EXPECT_EQ(shape("model.layers.1.mlp.shared_experts.gate_proj"), (S{64, 128}));
  // The router stays whole: every rank picks the same experts.
  EXPECT_EQ(shape("model.layers.1.mlp.gate"), (S{8, 128}));
}

TEST(DistGlm, TensorParallelMatchesOneProcessWithinTolerance) {
  const std::string dir = synth_glm_splittable("glm_tp");
  auto be = make_cpu_backend();
  auto ref = load_model(dir, *be);
  const auto ids = prompt_ids(ref->config().vocab_size);
  const auto want = test::prefill_then_greedy_logits(*ref, *be, ids, 6);
  const int64_t V = ref->config().vocab_size;
  for (bool patched : {false, true}) {
    const auto got = test::ranks_prefill_then_greedy_logits(dir, dist::Mode::Tensor, 2, ids, 6, patched);
    ASSERT_EQ(got.size(), want.size());
    const double d = rel_l2(got, want);
    RecordProperty(patched ? "rel_l2_tp2_patched" : "rel_l2_tp2", std::to_string(d));
    EXPECT_LE(d, 1e-2) << "patched " << patched;
    EXPECT_GT(d, 0.0);  // the shards really were summed in bf16, not the single-process path
    for (size_t r = 0; r < want.size() / size_t(V); ++r)
      EXPECT_EQ(argmax(got.data() + r * V, V), argmax(want.data() + r * V, V)) << "row " << r;
  }
}

TEST(DistGlm, TensorParallelRefusesWhatDoesNotDivide) {
  auto be = make_cpu_backend();
  const std::string dir = synth_glm_splittable("glm_refuse");
  try {
    load_model(dir, *be, placement(dist::Mode::Tensor, 0, 3));
    FAIL() << "3 ranks over 4 heads was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("4 attention heads do not divide across 3 ranks"), std::string::npos)
        << e.what();
  }
  // Stock tiny experts (moe_intermediate_size 64 = one group of 64): a half
  // would not start on a quantization group boundary.
  const std::string odd = test::synth_temp("glm4_moe_lite", "dist_glm_odd", 4);
  try {
    load_model(odd, *be, placement(dist::Mode::Tensor, 0, 2));
    FAIL() << "a 64-wide expert split in two was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("quantization group size"), std::string::npos) << e.what();
  }
}
