// MLX affine quantization (spec/architectures.md §0.2), following MLX's CPU
// quantize() in mlx/backend/cpu/quantized.cpp step for step, in fp32:
//
//   n_bins = 2^bits - 1, eps = 1e-7
//   w_max = max(group), w_min = min(group)
//   scale = max((w_max - w_min) / n_bins, eps)
//   if |w_min| > |w_max|: edge = w_min            (scale stays positive)
//   else:                 edge = w_max, scale = -scale
//   q0 = rint(edge / scale)                       (round half to even)
//   if q0 != 0: scale = edge / q0, bias = edge    (the larger-magnitude extreme is exact)
//   else:       bias = 0
//   q = clamp(rint((w - bias) / scale), 0, n_bins)
//   stored: bf16(scale), bf16(bias); q uses the fp32 scale/bias.
//
// Known differences from MLX's Metal kernel (what mlx_lm.convert runs on a
// Mac), which this file deliberately does not copy:
//   - Metal starts its max reduction at 0, i.e. w_max = max(0, max(group)), so
//     an all-negative group gets a different range/sign than here;
//   - Metal rounds with round() (half away from zero) instead of rint().
// Both only change which of two nearly equal encodings is chosen; the
// dequantized weights agree to within a quantization step.
//
// Note on accuracy: because scale is re-derived as edge/q0, the extreme on
// the far side can land slightly above n_bins and be clamped, so the
// reconstruction error of that element can reach |scale| (not |scale|/2).
#include "zmlx/quant/affine.h"

#include <cmath>
#include <limits>

#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"

namespace zmlx::quant {

bool supported(QuantParams p) {
  return (p.bits == 2 || p.bits == 4 || p.bits == 8) &&
         (p.group_size == 32 || p.group_size == 64 || p.group_size == 128);
}

void check_params(QuantParams p, int64_t cols, const char* what) {
  ZMLX_CHECK(p.bits == 2 || p.bits == 4 || p.bits == 8,
             "[quantize] {}: unsupported bits {} (expected 2, 4 or 8)", what, p.bits);
  ZMLX_CHECK(p.group_size == 32 || p.group_size == 64 || p.group_size == 128,
             "[quantize] {}: unsupported group_size {} (expected 32, 64 or 128)", what, p.group_size);
  ZMLX_CHECK(cols > 0 && cols % p.group_size == 0,
             "[quantize] {}: last dimension {} is not a positive multiple of group_size {}", what, cols,
             p.group_size);
}

void pack(const uint8_t* q, int64_t n, int bits, uint32_t* out) {
  const int per = 32 / bits;
  ZMLX_CHECK(n % per == 0, "[pack] {} values do not fill whole words of {} {}-bit values", n, per, bits);
  for (int64_t w = 0; w < n / per; ++w) {
    uint32_t word = 0;
    const uint8_t* src = q + w * per;
    for (int k = 0; k < per; ++k) word |= uint32_t(src[k]) << (k * bits);
    out[w] = word;
  }
}

void unpack(const uint32_t* packed, int64_t n, int bits, uint8_t* q) {
  const int per = 32 / bits;
  ZMLX_CHECK(n % per == 0, "[unpack] {} values do not fill whole words of {} {}-bit values", n, per, bits);
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t w = 0; w < n / per; ++w) {
    uint32_t word = packed[w];
    for (int k = 0; k < per; ++k) q[w * per + k] = uint8_t((word >> (k * bits)) & mask);
  }
}

GroupParams group_params(const float* w, int64_t n, int bits) {
  const float n_bins = float((1 << bits) - 1);
  const float eps = 1e-7f;
  float w_min = std::numeric_limits<float>::infinity();
  float w_max = -w_min;
  for (int64_t i = 0; i < n; ++i) {
    // Same NaN behaviour as std::max/std::min with the accumulator first.
    w_max = (w_max < w[i]) ? w[i] : w_max;
    w_min = (w[i] < w_min) ? w[i] : w_min;
  }
  const bool edge_is_min = std::abs(w_min) > std::abs(w_max);
  float range = (w_max - w_min) / n_bins;
  float scale = (range < eps) ? eps : range;  // std::max(range, eps)
  if (!edge_is_min) scale = -scale;
  const float edge = edge_is_min ? w_min : w_max;
  const float q0 = std::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  return {scale, bias};
}

uint8_t quantize_value(float w, GroupParams gp, int bits) {
  const float n_bins = float((1 << bits) - 1);
  float v = std::rint((w - gp.bias) / gp.scale);
  // clamp; NaN (e.g. 0/0 for inf inputs) becomes 0 — on Apple's CPU, where
  // MLX's reference runs, a NaN float->integer conversion also yields 0.
  if (!(v > 0.0f)) v = 0.0f;
  if (v > n_bins) v = n_bins;
  return uint8_t(v);
}

void quantize_row(const float* w, int64_t n, QuantParams p, uint32_t* packed, uint16_t* scales_bf16,
                  uint16_t* biases_bf16) {
  check_params(p, n, "row");
  const int per = 32 / p.bits;
  const int64_t groups = n / p.group_size;
  const int words_per_group = p.group_size / per;
  uint8_t q[128];
  for (int64_t g = 0; g < groups; ++g) {
    const float* wg = w + g * p.group_size;
    GroupParams gp = group_params(wg, p.group_size, p.bits);
    for (int i = 0; i < p.group_size; ++i) q[i] = quantize_value(wg[i], gp, p.bits);
    pack(q, p.group_size, p.bits, packed + g * words_per_group);
    scales_bf16[g] = f32_to_bf16_bits(gp.scale);
    biases_bf16[g] = f32_to_bf16_bits(gp.bias);
  }
}

void dequantize_row(const uint32_t* packed, const uint16_t* scales_bf16, const uint16_t* biases_bf16,
                    int64_t n, QuantParams p, float* out) {
  check_params(p, n, "row");
  const int per = 32 / p.bits;
  const uint32_t mask = (1u << p.bits) - 1u;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t g = c / p.group_size;
    const uint32_t q = (packed[c / per] >> (p.bits * (c % per))) & mask;
    out[c] = bf16_to_f32(scales_bf16[g]) * float(q) + bf16_to_f32(biases_bf16[g]);
  }
}

}  // namespace zmlx::quant
