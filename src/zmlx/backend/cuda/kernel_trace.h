// Kernel timeline of one replayed decode step, for finding where a step's
// time goes inside a CUDA graph (no Nsight Systems on the GPU machine).
// Only in a diagnostic build: cmake -DZMLX_KERNEL_TRACE=ON. Then
// ZMLX_KERNEL_TRACE_STEP=N prints, for the N-th replayed step, one line per
// kernel: when its first block started and when its programmatic-launch wait
// released (its predecessor finished), in ns from the step's first kernel.
// The difference between consecutive release times is what each kernel adds
// to the step. Normal builds compile none of it.
#pragma once
#include <cstdint>

namespace zmlx::cuda::dev {

struct KernelTraceRec {
  unsigned long long start_ns, go_ns;
  unsigned grid_x, grid_y, block, pad;
};
struct KernelTraceBuf {
  static constexpr unsigned long long kMax = 8192;
  unsigned long long n;
  KernelTraceRec rec[kMax];
};

}  // namespace zmlx::cuda::dev
