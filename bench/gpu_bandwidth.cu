// Measures the GPU's device-to-device copy bandwidth (bytes read + written
// per second), the yardstick docs/performance.md compares decode traffic to.
#include <cuda_runtime.h>

#include <cstdio>

int main() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
    std::fprintf(stderr, "gpu_bandwidth: no GPU or not enough memory\n");
    return 1;
  }
  cudaMemset(a, 1, bytes);
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);  // warm-up
  const int reps = 20;
  cudaEventRecord(t0);
  for (int i = 0; i < reps; ++i) cudaMemcpy(i % 2 ? a : b, i % 2 ? b : a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(t1);
  cudaEventSynchronize(t1);
  float ms = 0;
  cudaEventElapsedTime(&ms, t0, t1);
  const double gbps = 2.0 * double(bytes) * reps / (ms / 1e3) / 1e9;
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  std::printf("{\"device\": \"%s\", \"copy_gbps\": %.1f}\n", p.name, gbps);
  return 0;
}
