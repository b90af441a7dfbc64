// MLX "affine" quantization, bit-compatible with MLX's layout:
//   packed weights  uint32 [..., rows, cols * bits / 32], elements LSB-first
//   scales, biases  bf16   [..., rows, cols / group_size]
//   w[r, c] = scale[r, c/g] * q[r, c] + bias[r, c/g]
// Supported: bits 2, 4, 8; group sizes 32, 64, 128.
#pragma once
#include <cstdint>

namespace zmlx::quant {

struct QuantParams {
  int bits = 4;
  int group_size = 64;
};

bool supported(QuantParams p);
// Throws zmlx::Error when bits/group_size are unsupported or cols don't divide.
void check_params(QuantParams p, int64_t cols, const char* what);

inline int64_t packed_words(int64_t cols, int bits) { return cols * bits / 32; }

// q[i] < 2^bits; out has packed_words(n, bits) words. n must be a multiple of 32/bits.
void pack(const uint8_t* q, int64_t n, int bits, uint32_t* out);
void unpack(const uint32_t* packed, int64_t n, int bits, uint8_t* q);

// The fp32 scale and bias MLX's quantize() picks for one group of `n` values
// (before they are rounded to bf16 for storage). See affine.cpp.
struct GroupParams {
  float scale, bias;
};
GroupParams group_params(const float* w, int64_t n, int bits);
// q for one value given the group's fp32 params: clamp(rint((w - bias) / scale), 0, 2^bits - 1).
uint8_t quantize_value(float w, GroupParams gp, int bits);

// MLX's quantize(): for each group, w_max/w_min, scale = max((max-min)/n_bins, 1e-7),
// sign trick (bias = the extreme with the larger magnitude, scale may be
// negative), q = clamp(rint((w - bias) / scale), 0, n_bins); scale/bias stored
// as bf16. `w` is fp32 holding values already rounded to the source dtype.
void quantize_row(const float* w, int64_t n, QuantParams p, uint32_t* packed,
                  uint16_t* scales_bf16, uint16_t* biases_bf16);

// out[c] = fp32(scale) * q + fp32(bias)  (fp32, not rounded)
void dequantize_row(const uint32_t* packed, const uint16_t* scales_bf16,
                    const uint16_t* biases_bf16, int64_t n, QuantParams p, float* out);

}  // namespace zmlx::quant
