// What the CUDA runtime sees. Compiled only when nvcc is present; callers
// test ZMLX_HAVE_CUDA.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace zmlx::cuda {

struct DeviceInfo {
  int index;
  std::string name;
  int sm_major, sm_minor;
  uint64_t total_memory;
};

// Empty when no driver/device is present (never throws for that case).
std::vector<DeviceInfo> list_devices();

// Dequantizes `rows` MLX-affine rows (bits 4, any group size) on the GPU into
// fp32: out[r*cols + c] = scale * q + bias. Host pointers in, host out; used
// to check the device path against the CPU reference.
void dequantize_rows_4bit(const uint32_t* w, const uint16_t* scales, const uint16_t* biases, int64_t rows,
                          int64_t cols, int group_size, float* out);

}  // namespace zmlx::cuda
