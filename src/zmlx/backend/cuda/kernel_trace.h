// Kernel timeline of one replayed decode step, for finding where a step's
// time goes inside a CUDA graph (no Nsight Systems on the GPU machine).
// Only in a diagnostic build: cmake -DZMLX_KERNEL_TRACE=ON. Then
// ZMLX_KERNEL_TRACE_STEP=N records, for the N-th replayed step, every block
// of every kernel that calls pdl_begin: when it reached its
// programmatic-launch wait, when the wait released (the predecessor had
// finished) and when it left, in ns. Each block writes its record on its way
// out (ZMLX_TRACE_BLOCK_END, device_common.cuh); block (0,0,0) also writes
// its kernel's (rec). The difference between consecutive kernels' release
// times is what each kernel adds to the step.
//
// A kernel whose weights are meant to load before its wait only gets that
// overlap for the blocks that are resident before the release, and a block
// can only become resident where the kernels still running leave it
// registers, shared memory and threads. The host attributes each block to
// its kernel by launch shape and release time and prints how many started
// after the release ("late") and when the last block ended.
// Inside a kernel, ZMLX_TRACE_MARK(i) (i < kTraceMarks) records when the
// block's last warp passed that point, so the time after the release splits
// into phases (which phase a mark ends is said where the kernel places it).
// Each block also records the SM it ran on, so the blocks that shared an SM
// (and the SMs a kernel left idle) can be told apart.
// Normal builds compile none of it.
#pragma once
#include <cstdint>

namespace zmlx::cuda::dev {

struct KernelTraceRec {
  unsigned long long start_ns, go_ns;
  unsigned grid_x, grid_y, block, pad;
};
// Phase marks (ZMLX_TRACE_MARK(i), device_common.cuh): when the block's
// last warp passed mark i, 0 where no warp did.
constexpr int kTraceMarks = 4;
struct KernelBlockRec {
  unsigned long long start_ns, go_ns, end_ns;
  unsigned long long mark_ns[kTraceMarks];
  unsigned grid_x, grid_y;
  unsigned sm, pad;  // the SM the block ran on (%smid): which blocks shared an SM
};
struct KernelTraceBuf {
  static constexpr unsigned long long kMax = 8192;
  static constexpr unsigned long long kMaxBlocks = 1ull << 18;
  unsigned long long n, nb;
  KernelTraceRec rec[kMax];
  KernelBlockRec blk[kMaxBlocks];
};

}  // namespace zmlx::cuda::dev
