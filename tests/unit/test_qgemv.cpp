// The SIMD mat-vec kernels against the plain double-precision reference, for
// every kernel variant this CPU supports, at awkward sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_helpers.h"
#include "zmlx/backend/cpu/qgemv.h"

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
  for (Isa isa : {Isa::Portable, Isa::Avx512}) {
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
  for (Isa isa : {Isa::Portable, Isa::Avx512}) {
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
