// MLX affine quantization: bit layout fixed by hand, the sign trick and
// rounding of MLX's quantize(), and reconstruction error bounds.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"
#include "zmlx/quant/affine.h"

using namespace zmlx;
using namespace zmlx::quant;

namespace {

std::vector<uint8_t> iota_q(int n, int bits) {
  std::vector<uint8_t> q(n);
  for (int i = 0; i < n; ++i) q[i] = uint8_t(i % (1 << bits));
  return q;
}

// A group of `n` values that are zero except the given ones.
std::vector<float> group_with(int n, std::initializer_list<std::pair<int, float>> vals) {
  std::vector<float> g(n, 0.0f);
  for (auto [i, v] : vals) g[i] = v;
  return g;
}

}  // namespace

TEST(QuantPack, FourBitLayoutByHand) {
  auto q = iota_q(16, 4);
  uint32_t w[2] = {0xdeadbeef, 0xdeadbeef};
  pack(q.data(), 16, 4, w);
  EXPECT_EQ(w[0], 0x76543210u);
  EXPECT_EQ(w[1], 0xfedcba98u);
  // Little-endian bytes: low nibble of byte 0 is element 0.
  uint8_t bytes[4];
  std::memcpy(bytes, &w[0], 4);
  EXPECT_EQ(bytes[0], 0x10);
  EXPECT_EQ(bytes[3], 0x76);
}

TEST(QuantPack, TwoAndEightBitLayoutByHand) {
  std::vector<uint8_t> q2(16, 0);
  q2[0] = 1;
  q2[1] = 2;
  q2[15] = 3;
  uint32_t w2 = 0;
  pack(q2.data(), 16, 2, &w2);
  EXPECT_EQ(w2, 0xc0000009u);  // 1 | 2<<2 | 3<<30

  uint8_t q8[8] = {0x11, 0x22, 0x33, 0x44, 0xff, 0x00, 0x80, 0x01};
  uint32_t w8[2];
  pack(q8, 8, 8, w8);
  EXPECT_EQ(w8[0], 0x44332211u);
  EXPECT_EQ(w8[1], 0x018000ffu);
}

TEST(QuantPack, RoundTripAllBits) {
  std::mt19937 rng(7);
  for (int bits : {2, 4, 8}) {
    const int n = 96;
    std::vector<uint8_t> q(n), back(n, 0xAA);
    for (auto& v : q) v = uint8_t(rng() % (1u << bits));
    std::vector<uint32_t> w(packed_words(n, bits), 0xdeadbeef);
    pack(q.data(), n, bits, w.data());
    unpack(w.data(), n, bits, back.data());
    EXPECT_EQ(q, back) << bits << " bits";
  }
  uint8_t q[3] = {0, 0, 0};
  uint32_t w;
  EXPECT_THROW(pack(q, 3, 4, &w), zmlx::Error);
  EXPECT_THROW(unpack(&w, 3, 4, q), zmlx::Error);
}

TEST(QuantParamsCheck, RejectsUnsupported) {
  EXPECT_TRUE(supported({4, 64}));
  EXPECT_FALSE(supported({3, 64}));
  EXPECT_FALSE(supported({4, 16}));
  auto msg = [](QuantParams p, int64_t cols) {
    try {
      check_params(p, cols, "model.layers.0.mlp.gate");
    } catch (const zmlx::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(msg({3, 64}, 128).find("bits 3"), std::string::npos);
  EXPECT_NE(msg({4, 48}, 96).find("group_size 48"), std::string::npos);
  std::string m = msg({4, 64}, 96);
  EXPECT_NE(m.find("96"), std::string::npos);
  EXPECT_NE(m.find("model.layers.0.mlp.gate"), std::string::npos);
  EXPECT_EQ(msg({8, 128}, 256), "");
}

// |w_min| > |w_max|: positive scale, bias = w_min.
TEST(QuantAlgo, MinEdgeGivesPositiveScale) {
  auto g = group_with(32, {{0, -1.0f}, {1, 0.5f}});
  GroupParams gp = group_params(g.data(), 32, 4);
  EXPECT_GT(gp.scale, 0.0f);
  EXPECT_FLOAT_EQ(gp.scale, 0.1f);  // (0.5 - -1)/15 = 0.1, q0 = -10, scale = -1/-10
  EXPECT_EQ(gp.bias, -1.0f);
  EXPECT_EQ(quantize_value(-1.0f, gp, 4), 0);
  EXPECT_EQ(quantize_value(0.5f, gp, 4), 15);
  EXPECT_EQ(quantize_value(0.0f, gp, 4), 10);
}

// |w_min| <= |w_max|: negative scale, bias = w_max.
TEST(QuantAlgo, MaxEdgeGivesNegativeScale) {
  auto g = group_with(64, {{5, -0.5f}, {63, 1.0f}});
  GroupParams gp = group_params(g.data(), 64, 4);
  EXPECT_LT(gp.scale, 0.0f);
  EXPECT_FLOAT_EQ(gp.scale, -0.1f);
  EXPECT_EQ(gp.bias, 1.0f);
  EXPECT_EQ(quantize_value(1.0f, gp, 4), 0);
  EXPECT_EQ(quantize_value(-0.5f, gp, 4), 15);

  // Through quantize_row/dequantize_row: the max is reproduced exactly.
  std::vector<uint32_t> packed(8);
  uint16_t s, b;
  quantize_row(g.data(), 64, {4, 64}, packed.data(), &s, &b);
  EXPECT_LT(bf16_to_f32(s), 0.0f);
  EXPECT_EQ(bf16_to_f32(b), 1.0f);
  std::vector<float> out(64);
  dequantize_row(packed.data(), &s, &b, 64, {4, 64}, out.data());
  EXPECT_EQ(out[63], 1.0f);
}

// Equal magnitudes take the max branch (negative scale, bias = max).
TEST(QuantAlgo, EqualMagnitudesTakeMaxBranch) {
  auto g = group_with(32, {{0, -1.0f}, {1, 1.0f}});
  GroupParams gp = group_params(g.data(), 32, 4);
  // scale0 = -fp32(2/15); 1/scale0 = -7.4999995 in fp32 -> q0 = -7 -> scale = -1/7.
  EXPECT_EQ(gp.scale, 1.0f / -7.0f);
  EXPECT_EQ(gp.bias, 1.0f);
  EXPECT_EQ(quantize_value(-1.0f, gp, 4), 14);
}

// Because scale is re-derived as edge/q0, the far extreme can land above
// n_bins and be clamped: min -1, max 0.99 -> q0 = rint(-7.54) = -8, scale
// 0.125, (0.99 + 1)/0.125 = 15.92 -> 16 -> clamped to 15: error 0.115 > |scale|/2.
TEST(QuantAlgo, FarEdgeClamped) {
  auto g = group_with(32, {{0, -1.0f}, {1, 0.99f}});
  GroupParams gp = group_params(g.data(), 32, 4);
  EXPECT_EQ(gp.scale, 0.125f);
  EXPECT_EQ(gp.bias, -1.0f);
  EXPECT_EQ(quantize_value(0.99f, gp, 4), 15);
  const float err = std::abs(0.99f - (gp.scale * 15 + gp.bias));
  EXPECT_GT(err, gp.scale / 2);
  EXPECT_LE(err, gp.scale);
}

// rint (half to even), not round (half away from zero): edge/scale = -8.5 -> -8.
TEST(QuantAlgo, HalfToEvenRounding) {
  auto g = group_with(32, {{0, -8.5f}, {1, 6.5f}});  // range 15 -> scale0 = 1, edge/scale0 = -8.5
  GroupParams gp = group_params(g.data(), 32, 4);
  EXPECT_EQ(gp.scale, 1.0625f);  // -8.5 / -8 (round-half-away would give -8.5/-9)
  EXPECT_EQ(gp.bias, -8.5f);
  EXPECT_EQ(quantize_value(6.5f, gp, 4), 14);  // rint(15 / 1.0625) = rint(14.1)
  // Half-way q: (w - bias)/scale = 2.5 -> 2, 3.5 -> 4.
  GroupParams unit{1.0f, 0.0f};
  EXPECT_EQ(quantize_value(2.5f, unit, 4), 2);
  EXPECT_EQ(quantize_value(3.5f, unit, 4), 4);
  EXPECT_EQ(quantize_value(-3.0f, unit, 4), 0);    // clamp low
  EXPECT_EQ(quantize_value(99.0f, unit, 4), 15);   // clamp high
  EXPECT_EQ(quantize_value(99.0f, unit, 8), 99);
  EXPECT_EQ(quantize_value(std::nanf(""), unit, 4), 0);
}

TEST(QuantAlgo, ConstantGroups) {
  for (float c : {0.0f, 0.75f, -3.0f, 1e-20f, 1e30f}) {
    std::vector<float> g(64, c);
    std::vector<uint32_t> packed(packed_words(64, 4), 0xffffffffu);
    uint16_t s, b;
    quantize_row(g.data(), 64, {4, 64}, packed.data(), &s, &b);
    for (uint32_t w : packed) EXPECT_EQ(w, 0u) << c;  // every q is 0
    GroupParams gp = group_params(g.data(), 64, 4);
    EXPECT_LT(gp.scale, 0.0f) << c;  // |min| == |max|: max branch
    if (std::abs(c) > 1e-7f) {
      EXPECT_EQ(gp.bias, c);
      std::vector<float> out(64);
      dequantize_row(packed.data(), &s, &b, 64, {4, 64}, out.data());
      EXPECT_EQ(out[17], round_bf16(c)) << c;
    } else {
      EXPECT_EQ(gp.bias, 0.0f) << c;  // q0 = 0 -> bias 0, scale = -eps
      EXPECT_EQ(gp.scale, -1e-7f) << c;
    }
  }
}

TEST(QuantAlgo, DequantizeFormula) {
  // q = 3 everywhere in group 0, q = 1 in group 1.
  std::vector<uint8_t> q(64, 3);
  for (int i = 32; i < 64; ++i) q[i] = 1;
  std::vector<uint32_t> packed(8);
  pack(q.data(), 64, 4, packed.data());
  uint16_t s[2] = {f32_to_bf16_bits(-0.5f), f32_to_bf16_bits(0.25f)};
  uint16_t b[2] = {f32_to_bf16_bits(2.0f), f32_to_bf16_bits(-1.0f)};
  std::vector<float> out(64, 123.0f);
  dequantize_row(packed.data(), s, b, 64, {4, 32}, out.data());
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[31], 0.5f);
  EXPECT_EQ(out[32], -0.75f);
  EXPECT_EQ(out[63], -0.75f);
}

// Random rows of every bits x group size, awkward row counts, bf16-valued
// inputs of very different magnitudes. Checks, per element:
//  - with fp32 params: error <= |scale|/2 when not clamped, <= |scale| always;
//  - with the stored bf16 params: the same plus the bf16 rounding of scale and bias;
//  - bias is the group's extreme of larger magnitude (or 0 when q0 == 0).
TEST(QuantAlgo, ErrorBoundsAllCombos) {
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  int clamped_total = 0;
  for (int bits : {2, 4, 8}) {
    for (int gs : {32, 64, 128}) {
      for (int rows : {1, 3, 7}) {
        const int64_t cols = int64_t(gs) * 3;
        const QuantParams p{bits, gs};
        const float n_bins = float((1 << bits) - 1);
        for (int r = 0; r < rows; ++r) {
          const float mag = std::pow(10.0f, float(int(rng() % 13)) - 6.0f);  // 1e-6 .. 1e6
          std::vector<float> w(cols);
          for (auto& v : w) v = round_bf16(normal(rng) * mag);
          if (r % 2) w[rng() % cols] = round_bf16(-8.0f * mag);  // outlier, min edge
          std::vector<uint32_t> packed(packed_words(cols, bits), 0xdeadbeefu);
          std::vector<uint16_t> s(cols / gs, 0xffff), b(cols / gs, 0xffff);
          quantize_row(w.data(), cols, p, packed.data(), s.data(), b.data());
          std::vector<float> deq(cols);
          dequantize_row(packed.data(), s.data(), b.data(), cols, p, deq.data());
          std::vector<uint8_t> q(cols);
          unpack(packed.data(), cols, bits, q.data());
          for (int64_t g = 0; g < cols / gs; ++g) {
            const float* wg = w.data() + g * gs;
            GroupParams gp = group_params(wg, gs, bits);
            float mn = *std::min_element(wg, wg + gs), mx = *std::max_element(wg, wg + gs);
            ASSERT_TRUE(gp.bias == 0.0f || gp.bias == (std::abs(mn) > std::abs(mx) ? mn : mx));
            ASSERT_EQ(s[g], f32_to_bf16_bits(gp.scale));
            ASSERT_EQ(b[g], f32_to_bf16_bits(gp.bias));
            const float as = std::abs(gp.scale);
            const float ds = std::abs(bf16_to_f32(s[g]) - gp.scale), db = std::abs(bf16_to_f32(b[g]) - gp.bias);
            for (int i = 0; i < gs; ++i) {
              const int64_t c = g * gs + i;
              ASSERT_EQ(q[c], quantize_value(wg[i], gp, bits));
              const float exact = std::rint((wg[i] - gp.bias) / gp.scale);
              const bool clamped = exact < 0.0f || exact > n_bins;
              clamped_total += clamped;
              const float err32 = std::abs(wg[i] - (gp.scale * float(q[c]) + gp.bias));
              const float slack = 1e-5f * (std::abs(wg[i]) + as + std::abs(gp.bias)) + 1e-30f;
              ASSERT_LE(err32, (clamped ? as : as / 2) + slack)
                  << "bits " << bits << " gs " << gs << " row " << r << " col " << c << " w " << wg[i];
              const float err16 = std::abs(wg[i] - deq[c]);
              ASSERT_LE(err16, (clamped ? as : as / 2) + float(q[c]) * ds + db + slack)
                  << "bits " << bits << " gs " << gs << " row " << r << " col " << c;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(clamped_total, 0);  // the clamp case really happens on random data
}

TEST(QuantAlgo, ExtremeValues) {
  // Huge (finite range) and tiny (below eps) magnitudes.
  std::vector<float> big(32), tiny(32);
  for (int i = 0; i < 32; ++i) {
    big[i] = round_bf16(1e38f + float(i) * 6e36f);
    tiny[i] = (i % 2 ? 1.0f : -1.0f) * 1e-40f * float(i);
  }
  for (auto* w : {&big, &tiny}) {
    std::vector<uint32_t> packed(4);
    uint16_t s, b;
    quantize_row(w->data(), 32, {4, 32}, packed.data(), &s, &b);
    GroupParams gp = group_params(w->data(), 32, 4);
    std::vector<float> out(32);
    dequantize_row(packed.data(), &s, &b, 32, {4, 32}, out.data());
    for (int i = 0; i < 32; ++i) {
      EXPECT_TRUE(std::isfinite(out[i])) << i;
      EXPECT_LE(std::abs(out[i] - (*w)[i]), std::abs(gp.scale) * 1.01f + std::abs((*w)[i]) * 1e-2f) << i;
    }
  }
  GroupParams gt = group_params(tiny.data(), 32, 4);
  EXPECT_EQ(gt.bias, 0.0f);  // |edge/eps| < 0.5 -> q0 = 0
  // Non-finite input never crashes and q stays in range.
  std::vector<float> bad(64, 1.0f);
  bad[3] = std::numeric_limits<float>::infinity();
  bad[9] = std::nanf("");
  bad[10] = -std::numeric_limits<float>::infinity();
  std::vector<uint32_t> packed(packed_words(64, 8));
  uint16_t s, b;
  EXPECT_NO_THROW(quantize_row(bad.data(), 64, {8, 64}, packed.data(), &s, &b));
}
