// Kernel timeline of one replayed decode step, for finding where a step's
// time goes inside a CUDA graph (no Nsight Systems on the GPU machine).
// Only in a diagnostic build: cmake -DZMLX_KERNEL_TRACE=ON. Then
// ZMLX_KERNEL_TRACE_STEP=N prints, for the N-th replayed step, one line per
// kernel: when its first block started and when its programmatic-launch wait
// released (its predecessor finished), in ns from the step's first kernel.
// The difference between consecutive release times is what each kernel adds
// to the step. Normal builds compile none of it.
//
// Every block also leaves its own start and release (blk): a kernel whose
// weights are meant to load before its wait only gets that overlap for the
// blocks that are resident before the release, and a block can only become
// resident where the kernels still running leave it registers, shared memory
// and threads. The host attributes each block to its kernel by launch shape
// and release time and prints how many started after the release ("late").
// Kernels that hold a ZMLX_TRACE_BLOCK_END guard (the big ones) also leave
// when each block's thread 0 left, so the host can print when the kernel's
// last block ended: the step's critical path inside the kernel, apart from
// the boundary to the next one.
#pragma once
#include <cstdint>

namespace zmlx::cuda::dev {

struct KernelTraceRec {
  unsigned long long start_ns, go_ns;
  unsigned grid_x, grid_y, block, pad;
};
struct KernelBlockRec {
  unsigned long long start_ns, go_ns, end_ns;  // end_ns 0: not recorded
  unsigned grid_x, grid_y;
};
struct KernelTraceBuf {
  static constexpr unsigned long long kMax = 8192;
  static constexpr unsigned long long kMaxBlocks = 1ull << 18;
  unsigned long long n, nb;
  KernelTraceRec rec[kMax];
  KernelBlockRec blk[kMaxBlocks];
};

}  // namespace zmlx::cuda::dev
