#include "zmlx/core/dtype.h"

#include <cmath>

namespace zmlx {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::U32: case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::U8: return 1;
  }
  return 0;
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::U32: return "U32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F32: return "F32";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
  }
  return "?";
}

bool parse_dtype(std::string_view s, DType* out) {
  static const std::pair<std::string_view, DType> table[] = {
      {"U32", DType::U32}, {"BF16", DType::BF16}, {"F16", DType::F16},
      {"F32", DType::F32}, {"I32", DType::I32},   {"U8", DType::U8}};
  for (auto& [name, t] : table)
    if (name == s) { *out = t; return true; }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) { u = sign; }
    else {  // subnormal: normalise
      float f = std::ldexp(float(man), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16_bits(float f) {
  // Round to nearest even via the hardware-independent bit algorithm.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow -> inf
  if (a < 0x38800000u) {                                   // subnormal or zero
    float af;
    std::memcpy(&af, &a, 4);
    float scaled = af * 16777216.0f;  // 2^24
    uint32_t m = uint32_t(std::nearbyint(scaled));
    return uint16_t(sign | m);
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112<<23) and round
  return uint16_t(sign | (a >> 13));
}

}  // namespace zmlx
