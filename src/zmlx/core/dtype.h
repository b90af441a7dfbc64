// Element types and the scalar conversions the engine relies on.
// bf16 is stored as its raw 16 bits; conversions round to nearest even,
// exactly as MLX / PyTorch do when casting fp32 -> bf16.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace zmlx {

enum class DType : uint8_t { U32, BF16, F16, F32, I32, U8 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);          // safetensors spelling: "BF16", ...
bool parse_dtype(std::string_view s, DType* out);

struct bf16 {
  uint16_t bits = 0;
};

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f32(bf16 b) { return bf16_to_f32(b.bits); }

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(u >> 16);
}
inline bf16 to_bf16(float f) { return bf16{f32_to_bf16_bits(f)}; }
// Round an fp32 value to the nearest bf16 and back: the "bf16 rounding point".
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16_bits(f)); }

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16_bits(float f);

}  // namespace zmlx
