// Mat-vec kernel throughput: a 4-bit matrix that fits in L2 (compute bound)
// and one far larger than the caches (memory bound), single thread and all
// threads. Prints GMAC/s and GB/s per case.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "zmlx/backend/cpu/qgemv.h"
#include "zmlx/backend/cpu/repack.h"

using namespace zmlx;

static Weight make(int64_t rows, int64_t cols, std::mt19937& rng) {
  Weight w;
  w.rows = rows;
  w.cols = cols;
  w.quantized = true;
  w.q = {4, 64};
  w.w = host_tensor(DType::U32, {rows, cols / 8});
  w.scales = host_tensor(DType::BF16, {rows, cols / 64});
  w.biases = host_tensor(DType::BF16, {rows, cols / 64});
  for (int64_t i = 0; i < w.w.numel(); ++i) w.w.ptr<uint32_t>()[i] = uint32_t(rng());
  for (int64_t i = 0; i < w.scales.numel(); ++i) {
    w.scales.ptr<uint16_t>()[i] = f32_to_bf16_bits(0.01f);
    w.biases.ptr<uint16_t>()[i] = f32_to_bf16_bits(-0.07f);
  }
  return w;
}

static void run(const char* label, const Weight& w, int threads, int reps) {
  std::mt19937 rng(1);
  std::vector<uint16_t> x(size_t(w.cols));
  for (auto& v : x) v = f32_to_bf16_bits(float(rng() % 100) / 50.f - 1.f);
  cpu::PreparedRows px;
  px.prepare(x.data(), 1, w.cols, w.cols);
  std::vector<float> out(size_t(w.rows));
  const cpu::MatrixView m = cpu::matrix_view(w);
  omp_set_num_threads(threads);
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < w.rows / 16; ++b) cpu::gemv_rows(m, b * 16, b * 16 + 16, px, 0, 1, out.data() + b * 16, w.rows);
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  double macs = double(w.rows) * w.cols;
  std::printf("%-28s threads=%d  %7.2f GMAC/s  %7.2f GB/s\n", label, threads, macs / s / 1e9,
              double(w.bytes_per_matrix()) / s / 1e9);
}

// Several tokens per weight load (prefill): in-cache tiles, single thread.
static void run_tokens(const Weight& w, int T) {
  std::mt19937 rng(3);
  std::vector<uint16_t> x(size_t(T * w.cols));
  for (auto& v : x) v = f32_to_bf16_bits(float(rng() % 100) / 50.f - 1.f);
  cpu::PreparedRows px;
  px.prepare(x.data(), T, w.cols, w.cols, cpu::layouts_needed(cpu::matrix_view(w)));
  std::vector<float> out(size_t(T * w.rows));
  const cpu::MatrixView m = cpu::matrix_view(w);
  const int reps = 4000 / T + 1;
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) cpu::gemv_rows(m, 0, w.rows, px, 0, T, out.data(), w.rows);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
  std::printf("  tiles, %2d tokens per load    threads=1  %7.2f GMAC/s\n", T, double(T) * w.rows * w.cols / s / 1e9);
}

int main() {
  std::mt19937 rng(7);
  Weight small = make(512, 2048, rng);       // 0.6 MB: cache resident
  Weight big = make(131072, 2048, rng);      // 151 MB: DRAM
  Weight small_t = small, big_t = big;
  cpu::repack_rows16(small_t);
  cpu::repack_rows16(big_t);
  const int max_threads = omp_get_max_threads();
  for (int T : {1, 4, 16, 64}) run_tokens(small_t, T);
  for (int t = 1; t <= max_threads; ++t) {
    run("4-bit 512x2048 (in cache)", small, t, 2000);
    run("  row-interleaved tiles", small_t, t, 2000);
    run("4-bit 131072x2048 (DRAM)", big, t, 10);
    run("  row-interleaved tiles", big_t, t, 10);
  }
}
