// Quantized (and dense bf16) matrix-vector kernels for the CPU backend.
//
// out[t][r] = Σ_c x[t][c] · W[r][c]   for rows r in [r0, r1), tokens t < T
// computed in fp32 and returned unrounded (callers round to bf16 where MLX
// does). For an MLX-affine row the sum is taken per group:
//   Σ_g ( scale_g · Σ_{c∈g} x_c·q_c  +  bias_g · Σ_{c∈g} x_c )
// so the dequantized weight is never materialised.
//
// Every kernel variant (portable, AVX2, AVX-512) computes the same math with
// its own fp32 summation order; one process always uses one variant, chosen
// at start-up (or forced with ZMLX_CPU_ISA=portable|avx2|avx512), so fused and
// unfused paths that share these routines are bit-identical.
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

#include "zmlx/ops/weight.h"

namespace zmlx::cpu {

// Activation rows prepared once and then dotted with many weight rows:
// bf16 in the natural order, bf16 re-ordered to match the nibble layout of
// 2- and 4-bit words, fp32, and per-32-element sums (for the bias term).
// Which derived layouts to build (bf16 natural order and group sums always).
enum Layout : unsigned { kPerm4 = 1, kPerm2 = 2, kF32 = 4, kF32Perm4 = 8, kAllLayouts = 15 };

class PreparedRows {
 public:
  void prepare(const uint16_t* x, int64_t T, int64_t K, int64_t ldx, unsigned layouts = kAllLayouts);
  int64_t T() const { return T_; }
  int64_t K() const { return K_; }
  const uint16_t* natural(int64_t t) const { return nat_.data() + t * K_; }
  const uint16_t* permuted(int bits, int64_t t) const;  // bits 2 or 4
  const float* f32(int64_t t) const;
  // fp32, each 16-element block as [even elements, odd elements] (the AVX2
  // order of 4-bit low / high nibbles of 8 consecutive bytes).
  const float* f32_perm4(int64_t t) const;
  // Σ x over each group of size g, in order; g in {32, 64, 128}.
  const float* group_sums(int g, int64_t t) const;

 private:
  int64_t T_ = 0, K_ = 0;
  unsigned layouts_ = 0;
  std::vector<uint16_t> nat_, perm2_, perm4_;
  std::vector<float> f32_, f32p4_, sums32_, sums64_, sums128_;
};

// A 2-D view of one matrix of a Weight (one expert).
struct MatrixView {
  const uint32_t* w = nullptr;   // quantized: packed words
  const uint16_t* wd = nullptr;  // dense: bf16 values
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  int64_t rows = 0, cols = 0;
  int bits = 0, group = 0;       // bits == 0: dense bf16
  // 4-bit rows re-laid out in tiles of 16 (repack.h); when set, the kernel
  // reads these instead of w/scales/biases. Row ranges must then be whole tiles.
  const uint8_t* tiles = nullptr;
  const uint16_t* tile_scales = nullptr;
  const uint16_t* tile_biases = nullptr;
};
MatrixView matrix_view(const Weight& w, int64_t expert = -1);
// The layouts the active kernel variant reads for this matrix.
unsigned layouts_needed(const MatrixView& m);

enum class Isa { Portable, Avx2, Avx512 };
Isa active_isa();
std::string_view isa_name(Isa isa);
void force_isa(Isa isa);        // tests: run every variant
bool isa_supported(Isa isa);

// out[t * ldo + (r - r0)] for t < T (rows of `x` starting at t0).
void gemv_rows(const MatrixView& m, int64_t r0, int64_t r1, const PreparedRows& x, int64_t t0,
               int64_t T, float* out, int64_t ldo);

// Small vector helpers for attention, dispatched like the mat-vec kernels.
// dot of two bf16 vectors in fp32 (products exact, fp32 accumulation).
float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t n);
// y[i] += a * x[i] for a bf16 vector x and fp32 y.
void axpy_bf16(float a, const uint16_t* x, float* y, int64_t n);

// The plain reference: double-precision Σ x_c · (scale·q + bias), used only by tests.
double reference_dot(const MatrixView& m, int64_t row, const uint16_t* x_bf16);

namespace detail {
using GemvFn = void (*)(const MatrixView&, int64_t, int64_t, const PreparedRows&, int64_t, int64_t,
                        float*, int64_t);
void gemv_portable(const MatrixView&, int64_t, int64_t, const PreparedRows&, int64_t, int64_t,
                   float*, int64_t);
void gemv_avx512(const MatrixView&, int64_t, int64_t, const PreparedRows&, int64_t, int64_t,
                 float*, int64_t);
void gemv_avx2(const MatrixView&, int64_t, int64_t, const PreparedRows&, int64_t, int64_t, float*,
               int64_t);
float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n);
void axpy_bf16_avx512(float a, const uint16_t* x, float* y, int64_t n);
}  // namespace detail

}  // namespace zmlx::cpu
