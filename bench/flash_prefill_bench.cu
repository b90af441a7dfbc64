// GPU time of one prefill pass's attention (the flash kernel of mla.cu) at
// the three families' shapes: a pass of T queries after pos0 cached
// positions, causal. Reports µs a call and the tensor-core rate
// (2·heads·Σ_t (pos0 + t + 1)·(dqk + dv) flops: QKᵀ and P·V, masked keys
// not counted). Random bf16 in [-1, 1) stand in for q, k and v (speed only;
// the tests check the values). The kernel's form follows the ZMLX_CUDA_FLASH_*
// switches, read per call, so one binary compares forms in one run.
//   build/flash_prefill_bench [reps] [T]
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <vector>

#include "zmlx/backend/cuda/mla.h"

namespace mla = zmlx::cuda::mla;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

uint16_t* dev_random(size_t n, std::mt19937& rng) {
  std::vector<uint16_t> h(n);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto& v : h) {
    const float f = u(rng);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    v = uint16_t(b >> 16);
  }
  uint16_t* d = nullptr;
  check(cudaMalloc(&d, n * 2), "cudaMalloc");
  check(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

struct Shape {
  const char* name;
  int heads, kv_heads, dk, dr, dv;  // dr > 0: MLA's expanded form (attention_prefill)
};

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  const int T = argc > 2 ? std::atoi(argv[2]) : 4096;
  const Shape shapes[] = {{"qwen3_moe (32/4 heads of 128)", 32, 4, 128, 0, 128},
                          {"lfm2_moe (32/8 heads of 64)", 32, 8, 64, 0, 64},
                          {"glm4_moe_lite (20 heads, 192+64 / 256)", 20, 20, 192, 64, 256}};
  const int starts[] = {0, 12288, 28672};
  std::mt19937 rng(7);
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (const Shape& sh : shapes) {
    const int S = starts[2] + T;  // positions the cache holds
    const bool mla_form = sh.dr > 0;
    uint16_t* q = dev_random(size_t(T) * sh.heads * sh.dk, rng);
    uint16_t* k = dev_random(size_t(S) * sh.kv_heads * sh.dk, rng);
    uint16_t* v = dev_random(size_t(S) * sh.kv_heads * sh.dv, rng);
    uint16_t* q_pe = mla_form ? dev_random(size_t(T) * sh.heads * sh.dr, rng) : nullptr;
    uint16_t* k_pe = mla_form ? dev_random(size_t(S) * sh.dr, rng) : nullptr;
    uint16_t* out = nullptr;
    check(cudaMalloc(&out, size_t(T) * sh.heads * sh.dv * 2), "cudaMalloc");
    const float scale = 1.0f / std::sqrt(float(sh.dk + sh.dr));
    for (int pos0 : starts) {
      auto call = [&] {
        const bool ok = mla_form ? mla::attention_prefill(q, k, v, q_pe, k_pe, T, sh.heads, sh.kv_heads, sh.dk, sh.dv,
                                                          sh.dr, pos0, nullptr, scale, out, s)
                                 : mla::attention_prefill_cache(q, k, v, S, T, sh.heads, sh.kv_heads, sh.dk, pos0,
                                                                nullptr, scale, out, s);
        if (!ok) {
          std::fprintf(stderr, "%s: the flash kernel refused the shape\n", sh.name);
          std::exit(1);
        }
      };
      call();
      check(cudaStreamSynchronize(s), "warm-up");
      cudaEventRecord(e0, s);
      for (int i = 0; i < reps; ++i) call();
      cudaEventRecord(e1, s);
      check(cudaEventSynchronize(e1), "timed calls");
      check(cudaGetLastError(), "timed calls");
      float ms = 0.f;
      cudaEventElapsedTime(&ms, e0, e1);
      const double us = 1000.0 * ms / reps;
      const double pairs = double(T) * pos0 + double(T) * (T + 1) / 2.0;
      const double flops = 2.0 * sh.heads * pairs * double(sh.dk + sh.dr + sh.dv);
      std::printf("%-42s T=%d pos0=%-6d %10.1f us  %6.1f TFLOPS\n", sh.name, T, pos0, us, flops / us * 1e-6);
    }
    for (void* p : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q_pe),
                    static_cast<void*>(k_pe), static_cast<void*>(out)})
      if (p) cudaFree(p);
  }
  return 0;
}
