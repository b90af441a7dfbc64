// LFM2-MoE (spec §3): the short-conv and sigmoid-router ops against plain
// references, and the tiny synthetic model end to end: determinism, conv
// state + KV cache across chunked prefill, patched == unpatched bit for bit,
// and the patch counts on the real 24-layer structure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <random>

#include "test_helpers.h"
#include "zmlx/gen/generator.h"
#include "zmlx/gen/sampler.h"
#include "zmlx/models/model.h"
#include "zmlx/patch/patch.h"
#include "zmlx/synth/synth.h"
#include "model_test_helpers.h"

namespace zmlx {
namespace {

namespace fs = std::filesystem;

std::string synth_lfm2(const std::string& name, std::vector<std::pair<std::string, std::string>> sets = {},
                       uint64_t seed = 5) {
  return test::synth_temp("lfm2_moe", "lfm2_" + name, seed, std::move(sets));
}

using test::ids_of;

using test::greedy;

float bf(uint16_t b) { return bf16_to_f32(b); }
float rb(float f) { return round_bf16(f); }

TEST(Lfm2Ops, ShortConvMatchesHandReferenceAcrossCalls) {
  auto be = make_cpu_backend();
  std::mt19937 rng(11);
  const int64_t C = 40, L = 3, T1 = 5, T2 = 1, T3 = 4;
  auto wv = test::random_bf16(rng, size_t(C * L), 0.5f);
  Tensor w = test::bf16_tensor(wv, {C, L, 1});
  Tensor state = host_tensor(DType::BF16, {L - 1, C});
  std::fill(state.ptr<uint16_t>(), state.ptr<uint16_t>() + state.numel(), uint16_t(0));
  std::vector<uint16_t> bx_hist;  // every Bx row seen, for the reference
  for (int64_t T : {T1, T2, T3}) {
    auto in = test::random_bf16(rng, size_t(T * 3 * C));
    Tensor out = be->short_conv(test::bf16_tensor(in, {T, 3 * C}), state, w);
    ASSERT_EQ(out.rows(), T);
    ASSERT_EQ(out.cols(), C);
    const int64_t base = int64_t(bx_hist.size()) / C;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c)
        bx_hist.push_back(f32_to_bf16_bits(bf(in[size_t(t * 3 * C + c)]) * bf(in[size_t(t * 3 * C + 2 * C + c)])));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        // w0·Bx[t−2] + w1·Bx[t−1] + w2·Bx[t], zeros before the first token.
        const int64_t g = base + t;
        auto bx = [&](int64_t i) { return i < 0 ? 0.f : bf(bx_hist[size_t(i * C + c)]); };
        float acc = 0.f;
        acc += bx(g - 2) * bf(wv[size_t(c * L + 0)]);
        acc += bx(g - 1) * bf(wv[size_t(c * L + 1)]);
        acc += bx(g) * bf(wv[size_t(c * L + 2)]);
        const float want = rb(bf(in[size_t(t * 3 * C + C + c)]) * rb(acc));
        ASSERT_EQ(bf(out.ptr<uint16_t>()[t * C + c]), want) << "t=" << g << " c=" << c;
      }
    // The state holds the last two Bx rows.
    const int64_t n = int64_t(bx_hist.size()) / C;
    for (int64_t i = 0; i < L - 1; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = n - (L - 1) + i;
        const uint16_t want = g < 0 ? 0 : bx_hist[size_t(g * C + c)];
        ASSERT_EQ(state.ptr<uint16_t>()[i * C + c], want);
      }
  }
}

TEST(Lfm2Ops, SigmoidRouterMatchesPlainReference) {
  auto be = make_cpu_backend();
  std::mt19937 rng(12);
  const int64_t T = 37, E = 32, k = 4;
  auto lv = test::random_bf16(rng, size_t(T * E), 2.0f);
  Tensor logits = test::bf16_tensor(lv, {T, E});
  Tensor bias = host_tensor(DType::F32, {E});
  std::normal_distribution<float> nd(0.f, 0.05f);
  for (int64_t e = 0; e < E; ++e) bias.ptr<float>()[e] = nd(rng);
  for (float scaling : {1.0f, 1.8f}) {
    Routing r = be->route_sigmoid_topk(logits, bias, k, /*normalize=*/true, 1e-6f, scaling);
    ASSERT_EQ(r.k, k);
    ASSERT_EQ(r.scores.dtype, DType::BF16);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<float> sw(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) {
        sw[size_t(e)] = rb(1.0f / (1.0f + std::exp(-bf(lv[size_t(t * E + e)]))));
        sel[size_t(e)] = sw[size_t(e)] + bias.ptr<float>()[e];
      }
      std::vector<int32_t> ord(static_cast<size_t>(E));
      std::iota(ord.begin(), ord.end(), 0);
      std::stable_sort(ord.begin(), ord.end(), [&](int32_t a, int32_t b) { return sel[size_t(a)] > sel[size_t(b)]; });
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += sw[size_t(ord[size_t(j)])];
      const float denom = rb(rb(sum) + 1e-6f);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ord[size_t(j)];
        EXPECT_EQ(r.experts.ptr<int32_t>()[t * k + j], e) << "t=" << t << " j=" << j;
        const float want = rb(rb(sw[size_t(e)] / denom) * scaling);
        EXPECT_EQ(bf(r.scores.ptr<uint16_t>()[t * k + j]), want) << "t=" << t << " j=" << j;
      }
    }
  }
  // The bias steers selection only: a huge bias on expert 3 selects it
  // everywhere, with its unbiased sigmoid as the weight.
  bias.ptr<float>()[3] = 100.f;
  Routing r = be->route_sigmoid_topk(logits, bias, k, /*normalize=*/false, 1e-6f, 1.0f);
  for (int64_t t = 0; t < T; ++t) {
    EXPECT_EQ(r.experts.ptr<int32_t>()[t * k], 3);
    EXPECT_EQ(bf(r.scores.ptr<uint16_t>()[t * k]), rb(1.0f / (1.0f + std::exp(-bf(lv[size_t(t * E + 3)])))));
  }
}

TEST(Lfm2Model, TinyLoadsAndGeneratesDeterministically) {
  auto be = make_cpu_backend();
  const std::string dir = synth_lfm2("det");
  auto m = load_model(dir, *be);
  EXPECT_EQ(m->family(), "lfm2_moe");
  const auto kinds = m->layer_kinds();
  ASSERT_EQ(kinds.size(), 6u);
  EXPECT_EQ(kinds[0], "conv+swiglu_mlp");
  EXPECT_EQ(kinds[2], "attention+moe");
  EXPECT_EQ(kinds[3], "conv+moe");
  EXPECT_EQ(kinds[5], "attention+moe");
  EXPECT_EQ(m->config().eos_token_ids, std::vector<int32_t>{7});
  const auto prompt = ids_of(9, m->config().vocab_size);
  const auto a = greedy(*m, *be, prompt, 8);
  auto m2 = load_model(dir, *be);
  EXPECT_EQ(a, greedy(*m2, *be, prompt, 8));
  for (int32_t t : a) EXPECT_TRUE(t >= 0 && t < m->config().vocab_size);
}

TEST(Lfm2Model, ChunkedPrefillEqualsOnePassAndTokenByTokenBitForBit) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_lfm2("chunks"), *be);
  const auto ids = ids_of(23, m->config().vocab_size);
  const auto one = test::last_logits(*m, *be, ids, ids.size());
  EXPECT_EQ(one, test::last_logits(*m, *be, ids, 1));
  EXPECT_EQ(one, test::last_logits(*m, *be, ids, 2));
  EXPECT_EQ(one, test::last_logits(*m, *be, ids, 5));
  // The conv state matters: a different earlier token changes the logits.
  auto other = ids;
  other[ids.size() - 3] = (other[ids.size() - 3] + 1) % int32_t(m->config().vocab_size);
  EXPECT_NE(one, test::last_logits(*m, *be, other, 1));
}

TEST(Lfm2Model, PatchedLogitsAreBitIdenticalToUnpatched) {
  auto be = make_cpu_backend();
  auto m = load_model(synth_lfm2("patch"), *be);
  for (size_t n : {1u, 7u, 40u}) {
    const auto ids = ids_of(n, m->config().vocab_size);
    const auto base = test::prefill_then_greedy_logits(*m, *be, ids);
    patch::PatchOptions o;
    o.enabled = true;
    o.quiet = true;
    const auto rep = patch::patch(*m, o);
    EXPECT_EQ(rep.counts_str(), "{'swiglu_mlp': 2, 'moe_mlp': 4}");
    EXPECT_EQ(test::prefill_then_greedy_logits(*m, *be, ids), base) << n << " tokens";
    EXPECT_EQ(patch::unpatch(*m), 6);
  }
}

TEST(Lfm2Model, PatchCountsOnTheRealLayerStructure) {
  // Tiny widths, the real 24-layer structure (spec §3.1): 6 attention layers,
  // 2 dense FFN layers, 22 MoE layers.
  auto be = make_cpu_backend();
  auto m = load_model(synth_lfm2("counts", {{"num_hidden_layers", "24"},
                                            {"full_attn_idxs", "[2, 6, 10, 14, 18, 21]"},
                                            {"num_dense_layers", "2"}}),
                      *be);
  const auto kinds = m->layer_kinds();
  ASSERT_EQ(kinds.size(), 24u);
  EXPECT_EQ(std::count_if(kinds.begin(), kinds.end(), [](auto& s) { return s.rfind("attention+", 0) == 0; }), 6);
  patch::PatchOptions o;
  o.enabled = true;
  o.quiet = true;
  EXPECT_EQ(patch::patch(*m, o).counts_str(), "{'swiglu_mlp': 2, 'moe_mlp': 22}");
}

}  // namespace
}  // namespace zmlx
