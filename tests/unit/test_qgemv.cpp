// The SIMD mat-vec kernels against the plain double-precision reference, for
// every kernel variant this CPU supports, at awkward sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_helpers.h"
#include "zmlx/backend/cpu/qgemv.h"
#include "zmlx/backend/cpu/repack.h"

namespace zmlx {
namespace {

using cpu::Isa;

struct Case {
  int bits, group;
  int64_t rows, cols, T;
};

class QgemvTest : public ::testing::TestWithParam<Case> {};

void check_against_reference(const Weight& w, int64_t T, std::mt19937& rng) {
  const int64_t K = w.cols, N = w.rows;
  auto x = test::random_bf16(rng, size_t(T * K));
  cpu::PreparedRows px;
  px.prepare(x.data(), T, K, K);
  const cpu::MatrixView m = cpu::matrix_view(w, w.experts > 0 ? w.experts - 1 : -1);
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    cpu::force_isa(isa);
    std::vector<float> out(size_t(T * N), std::numeric_limits<float>::quiet_NaN());
    // Two row ranges, so range offsets are exercised too.
    const int64_t split = N / 3;
    cpu::gemv_rows(m, 0, split, px, 0, T, out.data(), N);
    cpu::gemv_rows(m, split, N, px, 0, T, out.data() + split, N);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < N; ++r) {
        const double ref = cpu::reference_dot(m, r, x.data() + t * K);
        double mag = 0;  // Σ|x·w|: the scale of the fp32 rounding error
        for (int64_t c = 0; c < K; ++c) mag += std::fabs(bf16_to_f32(x[size_t(t * K + c)]));
        const double tol = 1e-5 * mag + 1e-5;
        ASSERT_NEAR(out[size_t(t * N + r)], ref, tol)
            << "isa=" << cpu::isa_name(isa) << " bits=" << m.bits << " group=" << m.group << " row=" << r << " t=" << t;
      }
  }
  cpu::force_isa(cpu::isa_supported(Isa::Avx512) ? Isa::Avx512 : Isa::Portable);
}

TEST_P(QgemvTest, QuantizedMatchesReference) {
  const Case c = GetParam();
  std::mt19937 rng(1234 + c.bits * 7 + c.group + int(c.cols));
  Weight w = test::random_qweight(rng, 3, c.rows, c.cols, c.bits, c.group);
  check_against_reference(w, c.T, rng);
}

INSTANTIATE_TEST_SUITE_P(
    AllFormats, QgemvTest,
    ::testing::Values(Case{4, 64, 37, 256, 1}, Case{4, 64, 19, 2048, 5}, Case{4, 32, 33, 192, 3},
                      Case{4, 128, 17, 384, 7}, Case{4, 32, 9, 96, 2} /* cols % 64 != 0: fallback */,
                      Case{8, 64, 21, 256, 1}, Case{8, 32, 13, 160, 4}, Case{8, 128, 11, 512, 6},
                      Case{2, 32, 15, 256, 3}, Case{2, 64, 7, 384, 1}, Case{2, 128, 23, 640, 5},
                      Case{2, 32, 5, 96, 2} /* cols % 128 != 0: fallback */));

TEST(Qgemv, DenseBf16MatchesReference) {
  std::mt19937 rng(99);
  for (int64_t K : {64, 96, 2048, 100}) {
    Weight w = test::random_dense_weight(rng, 0, 29, K);
    check_against_reference(w, 5, rng);
  }
}

TEST(Qgemv, NibbleOrderIsLsbFirst) {
  // One row, 64 columns, 4-bit: code of column c is c % 16. Scale 1, bias 0,
  // x = one-hot at column c  ->  output must be exactly c % 16.
  Weight w;
  w.name = "onehot";
  w.rows = 1;
  w.cols = 64;
  w.quantized = true;
  w.q = {4, 64};
  w.w = host_tensor(DType::U32, {1, 8});
  w.scales = host_tensor(DType::BF16, {1, 1});
  w.biases = host_tensor(DType::BF16, {1, 1});
  for (int i = 0; i < 8; ++i) w.w.ptr<uint32_t>()[i] = i % 2 == 0 ? 0x76543210u : 0xfedcba98u;
  w.scales.ptr<uint16_t>()[0] = f32_to_bf16_bits(1.f);
  w.biases.ptr<uint16_t>()[0] = f32_to_bf16_bits(0.f);
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    cpu::force_isa(isa);
    for (int c = 0; c < 64; ++c) {
      std::vector<uint16_t> x(64, 0);
      x[size_t(c)] = f32_to_bf16_bits(1.f);
      cpu::PreparedRows px;
      px.prepare(x.data(), 1, 64, 64);
      float out = -1;
      cpu::gemv_rows(cpu::matrix_view(w), 0, 1, px, 0, 1, &out, 1);
      EXPECT_EQ(out, float(c % 16)) << "column " << c << " isa " << cpu::isa_name(isa);
    }
  }
}

}  // namespace
}  // namespace zmlx

namespace zmlx {
namespace {

TEST(QgemvRepacked, TilesMatchReferenceAndCheckpointLayout) {
  if (!cpu::isa_supported(cpu::Isa::Avx512)) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  cpu::force_isa(cpu::Isa::Avx512);
  std::mt19937 rng(77);
  for (auto [rows, cols, group, T] : {std::tuple{48, 256, 64, 1}, std::tuple{32, 384, 128, 5}, std::tuple{16, 96, 32, 3},
                                      std::tuple{64, 2048, 64, 2}}) {
    Weight w = test::random_qweight(rng, 2, rows, cols, 4, group);
    Weight r = w;
    ASSERT_TRUE(cpu::can_repack(r));
    cpu::repack_rows16(r);
    auto x = test::random_bf16(rng, size_t(T * cols));
    cpu::PreparedRows px;
    px.prepare(x.data(), T, cols, cols);
    for (int64_t e = 0; e < 2; ++e) {
      const cpu::MatrixView plain = cpu::matrix_view(w, e), tiled = cpu::matrix_view(r, e);
      ASSERT_NE(tiled.tiles, nullptr);
      std::vector<float> a(size_t(T * rows), std::nanf("")), b(size_t(T * rows), std::nanf(""));
      cpu::gemv_rows(tiled, 0, 16, px, 0, T, b.data(), rows);  // first tile alone, then the rest
      cpu::gemv_rows(tiled, 16, rows, px, 0, T, b.data() + 16, rows);
      cpu::gemv_rows(plain, 0, rows, px, 0, T, a.data(), rows);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < rows; ++i) {
          const double ref = cpu::reference_dot(plain, i, x.data() + t * cols);
          double mag = 0;
          for (int64_t c = 0; c < cols; ++c) mag += std::fabs(bf16_to_f32(x[size_t(t * cols + c)]));
          ASSERT_NEAR(b[size_t(t * rows + i)], ref, 1e-5 * mag + 1e-5) << "expert " << e << " row " << i;
          ASSERT_NEAR(b[size_t(t * rows + i)], a[size_t(t * rows + i)], 2e-5 * mag + 1e-5);
        }
    }
  }
}

}  // namespace
}  // namespace zmlx
