// Memory read bandwidth of this machine: an AVX-512 read loop over 2 GiB,
// 1 and N threads, best of 5. The decode roofline is this / bytes per token.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
int main() {
  size_t n = size_t(2) << 30;
  char* p = (char*)aligned_alloc(2 << 20, n); madvise(p, n, MADV_HUGEPAGE); memset(p, 1, n);
  for (int th = 1; th <= 2; ++th) {
    omp_set_num_threads(th);
    double best = 0;
    for (int r = 0; r < 5; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      long long tot = 0;
#pragma omp parallel reduction(+:tot)
      {
        __m512i acc = _mm512_setzero_si512();
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i += 256) {
          acc = _mm512_add_epi64(acc, _mm512_load_si512(p + i));
          acc = _mm512_add_epi64(acc, _mm512_load_si512(p + i + 64));
          acc = _mm512_add_epi64(acc, _mm512_load_si512(p + i + 128));
          acc = _mm512_add_epi64(acc, _mm512_load_si512(p + i + 192));
        }
        tot += _mm512_reduce_add_epi64(acc);
      }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (n / s / 1e9 > best) best = n / s / 1e9;
      if (tot == 42) printf("x");
    }
    printf("threads=%d read bandwidth %.1f GB/s (best of 5, 2 GiB)\n", th, best);
  }
}
