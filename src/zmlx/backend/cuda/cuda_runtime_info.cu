#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/cuda_runtime_info.h"

namespace zmlx::cuda {

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

std::vector<DeviceInfo> list_devices() {
  std::vector<DeviceInfo> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out.push_back({i, p.name, p.major, p.minor, uint64_t(p.totalGlobalMem)});
  }
  return out;
}

__global__ void dequantize_4bit_kernel(const uint32_t* w, const __nv_bfloat16* s, const __nv_bfloat16* b,
                                       int64_t rows, int64_t cols, int group, float* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i % cols;
  const uint32_t q = (w[r * (cols / 8) + c / 8] >> (4 * (c % 8))) & 0xf;
  const int64_t g = r * (cols / group) + c / group;
  out[i] = __bfloat162float(s[g]) * float(q) + __bfloat162float(b[g]);
}

void dequantize_rows_4bit(const uint32_t* w, const uint16_t* scales, const uint16_t* biases, int64_t rows,
                          int64_t cols, int group_size, float* out) {
  const size_t nw = size_t(rows * cols / 8), ng = size_t(rows * cols / group_size), no = size_t(rows * cols);
  uint32_t* dw;
  __nv_bfloat16 *ds, *db;
  float* dout;
  check(cudaMalloc(&dw, nw * 4), "cudaMalloc");
  check(cudaMalloc(&ds, ng * 2), "cudaMalloc");
  check(cudaMalloc(&db, ng * 2), "cudaMalloc");
  check(cudaMalloc(&dout, no * 4), "cudaMalloc");
  check(cudaMemcpy(dw, w, nw * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(ds, scales, ng * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  check(cudaMemcpy(db, biases, ng * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  const int threads = 256;
  dequantize_4bit_kernel<<<unsigned((no + threads - 1) / threads), threads>>>(dw, ds, db, rows, cols, group_size, dout);
  check(cudaGetLastError(), "dequantize kernel launch");
  check(cudaMemcpy(out, dout, no * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(dw);
  cudaFree(ds);
  cudaFree(db);
  cudaFree(dout);
}

}  // namespace zmlx::cuda
