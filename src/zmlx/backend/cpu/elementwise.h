// Scalar bf16 helpers shared by every CPU op that needs them, so fused and
// unfused paths round at exactly the same points.
#pragma once
#include <cmath>

#include "zmlx/core/dtype.h"

namespace zmlx::cpu {

// MLX: silu(gate) * up on bf16 arrays = bf16(bf16(gate * bf16(sigmoid(gate))) * up).
inline uint16_t swiglu_bf16(uint16_t gate, uint16_t up) {
  const float g = bf16_to_f32(gate);
  const float sig = round_bf16(1.0f / (1.0f + std::exp(-g)));
  const float s = round_bf16(g * sig);
  return f32_to_bf16_bits(s * bf16_to_f32(up));
}

}  // namespace zmlx::cpu
