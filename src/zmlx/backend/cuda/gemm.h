// Tensor-core GEMMs for the many-token (prefill) path of the CUDA backend.
//
// Every kernel computes bf16(x · Wᵀ) with W an MLX-affine quantized matrix
// (bits 2/4/8, group 32/64/128) or dense bf16, in tiles of 64 tokens x 128
// weight rows x 64 K: W tiles are dequantized in shared memory to
// bf16(fma(scale, q, bias)) (the same rounding as MLX's qmm prefill path),
// then multiplied with mma.sync m16n8k16 bf16 -> fp32. Results are rounded
// to bf16 once (round-to-nearest-even). Against the mat-vec kernels in
// kernels.cu (which keep the weights in fp32) results differ by about one
// bf16 ulp: the weight rounding to bf16 is the only extra approximation.
//
// MoE: the P = T·k (token, slot) pairs are bucketed by expert on the device
// (counting sort: counts, offsets, a permutation sorted by expert then by
// pair index — deterministic) and each expert's rows are multiplied by that
// expert's matrix. Outputs are written per pair (row p of a [P, N] array),
// so the order of the MoE sum over slots stays fixed (moe_combine).
//
// Activations (x, h) and outputs must be 16-byte aligned with rows packed
// (row stride = K or N elements); cudaMalloc'd tensors qualify.
//
// All functions enqueue on stream s and return at once; they launch without
// programmatic dependent launch, so ordinary stream order applies. They are
// capturable in a CUDA graph (no host synchronization, no allocation).
#pragma once
#include <cstddef>
#include <cstdint>

#include "zmlx/backend/cuda/kernels.h"  // QMat, Combine (read only)

namespace zmlx::cuda::gemm {

using QMat = ::zmlx::cuda::k::QMat;
using Combine = ::zmlx::cuda::k::Combine;

// Largest expert id + 1 the bucketing handles.
constexpr int kMaxExperts = 1024;

// cols % 64 == 0, bits in {2, 4, 8, 16}, group in {32, 64, 128} when
// quantized, rows >= 1, pointers 16-byte aligned per row (true for MLX
// checkpoints whose cols is a multiple of 64).
bool gemm_supported(const QMat& w);

// Dense GEMMs whose (tokens x rows) tile grid is small split K over blocks
// (fp32 partial sums, added in split order by a second kernel): they need
// this many bytes of device workspace (0: no split). The split depends on
// T and w's shape only, so gemm_dense_swiglu and the two gemm_dense of the
// same MLP split alike (swiglu: pass true; same bits either way).
size_t gemm_dense_workspace_bytes(int T, const QMat& w, bool swiglu);

// y[T, N] = bf16(x[T, K] · Wᵀ), N = w.rows, K = w.cols. Uses expert 0 of w.
// workspace: gemm_dense_workspace_bytes(T, w, false) bytes (may be null when 0).
void gemm_dense(const uint16_t* x, int T, const QMat& w, uint16_t* y, cudaStream_t s, float* workspace = nullptr);

// y[T, I] = swiglu(bf16(x · Gᵀ), bf16(x · Uᵀ)) (dense MLP; swiglu as below).
// workspace: gemm_dense_workspace_bytes(T, g, true) bytes.
void gemm_dense_swiglu(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s,
                       float* workspace = nullptr);

// Bytes of device workspace moe_gate_up_swiglu / moe_down need for T tokens
// with k slots each (E = number of experts, <= kMaxExperts; only checked).
size_t moe_workspace_bytes(int T, int k, int E);

// out[p, i] = swiglu(bf16(x[p / k] · G_e[i]), bf16(x[p / k] · U_e[i])),
// e = experts[p], p < P = T·k; out is [P, I] (I = g.rows).
// swiglu(g, u) = bf16(bf16(g · bf16(1 / (1 + expf(-g)))) · u).
// experts[p] must lie in [0, num_experts) (num_experts 0: unknown, then
// [0, kMaxExperts)); pairs with other ids are skipped (their output rows are
// left untouched). num_experts also sizes the grid (0: as for 128 experts;
// the blocks stride over the tiles, so a small grid is only slower).
void moe_gate_up_swiglu(const uint16_t* x, const int32_t* experts, int T, int k, const QMat& g, const QMat& u,
                        uint16_t* out, void* workspace, cudaStream_t s, int num_experts = 0);

// y[p, d] = bf16(h[p] · D_e[d]), e = experts[p]; h is [P, I], y is [P, D]
// (D = d.rows). Follow with moe_combine for the weighted sum over slots.
// experts and num_experts as for moe_gate_up_swiglu (ids from num_experts up
// are skipped; 0: unknown).
void moe_down(const uint16_t* h, const int32_t* experts, int T, int k, const QMat& d, uint16_t* y, void* workspace,
              cudaStream_t s, int num_experts = 0);

// y[p, n] = bf16(x_p · W_e[n]), e = experts[p]; x_p = x[p] when per_slot
// (x is [P, K]), else x[p / k] (x is [T, K]); y is [P, N]. moe_down is the
// per_slot case; experts and num_experts as for moe_gate_up_swiglu.
void moe_linear(const uint16_t* x, bool per_slot, const int32_t* experts, int T, int k, const QMat& w, uint16_t* y,
                void* workspace, cudaStream_t s, int num_experts = 0);
// The P pairs bucketed by expert as above, in tiles of at most
// k::kGroupPairs pairs of one expert, for k::gather_*_grouped. workspace:
// pair_groups_workspace_bytes(P) bytes; the result points into it.
// num_experts: the matrices' expert count (bounds the launched tiles; 0:
// kMaxExperts). Ids from num_experts up are left out, as ids past
// kMaxExperts are.
size_t pair_groups_workspace_bytes(int64_t P);
::zmlx::cuda::k::PairGroups bucket_pairs(const int32_t* experts, int64_t P, void* workspace, cudaStream_t s,
                                         int num_experts);
// Whether moe_linear runs w in its 3-stage, 3-blocks-an-SM form on the
// current device: 4-bit weights, ZMLX_GEMM_MOE_3STAGE not "0", an SM whose
// shared memory holds three such blocks (sm_90). The same bits either way.
bool moe_linear_three_stage(const QMat& w);

// out[t, d] = bf16(Σ_{j=0..k-1} term(y[t·k + j, d], score[t·k + j])) summed
// in fp32 in slot order; term = bf16(y · bf16 score) (kBf16Products) or
// y · score in fp32 (kF32Products; scores bf16 or f32). Same contract and
// rounding as k::moe_combine (kernels.h).
void moe_combine(const uint16_t* y, const void* scores, bool scores_f32, Combine mode, int T, int k, int64_t D,
                 uint16_t* out, cudaStream_t s);

}  // namespace zmlx::cuda::gemm
