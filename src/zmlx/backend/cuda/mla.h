// Faster kernels for multi-latent attention (GLM-4.7-Flash, glm4_moe_lite),
// and the flash-attention prefill they share with plain GQA attention.
//
// Each function returns false (and enqueues nothing) when the shapes or
// alignments are outside what it handles; the caller then uses the plain
// kernels in kernels.cu, which stay the reference (ZMLX_CUDA_MLA=0 forces
// them everywhere).
//
// - attention_prefill: flash-attention for T > 1 (expanded form): a block per
//   (head, 64 or 128 queries), keys in tiles of 64 through shared memory, mma.sync
//   bf16 -> fp32 for QKᵀ and PV, online softmax in registers. Scores are
//   scale·(q·k) + bf16(q_pe'·k_pe) as in the reference; P is rounded to bf16
//   for the PV product (the usual flash-attention approximation).
// - attention_prefill_cache: the same kernel for plain GQA prefill (dr = 0),
//   keys and values read from the KV cache ([kv heads][capacity][hd]);
//   Qwen3 and LFM2 prefill go through it.
// - attention_decode: the split partials for T = 1 (absorbed form, k = v =
//   the latent cache): 16-byte loads, 4 keys per warp step with interleaved
//   reductions, and the key row reused as the value row when k == v.
//   GLM-4.7-Flash's shapes (one kv head, 512 latent + 64 rotary dims, up to
//   32 heads) take pe_decode_mma_kernel instead: a block per (split, tile of
//   heads), scores and P·V on tensor cores with P rounded to bf16
//   (decode_on_tensor_cores; ZMLX_CUDA_MLA_MMA=0: never).
// - multi_linear_n: out[t, h·C + c] = Σ_r x[t, h, r] · W[h][r][c] on tensor
//   cores (W dequantized per tile to bf16(fma(scale, q, bias)), as gemm.cu).
//
// The decode kernels enqueue with programmatic dependent launch (as kernels.cu's),
// the prefill ones without.
#pragma once
#include <cstdint>

#include "zmlx/backend/cuda/kernels.h"  // QMat

namespace zmlx::cuda::mla {

using QMat = zmlx::cuda::k::QMat;

// The flash prefill kernel's form for these shapes under the current
// switches and the card's shared memory: dk fixed at compile time (0: the
// run-time-shape form) and warps a block (4 or 8; 0: no block fits, and the
// prefill functions below return false).
struct FlashForm {
  int dk = 0, warps = 0;
};
FlashForm flash_form(int dv, int dk, int dr);
bool attention_prefill(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe,
                       const uint16_t* k_pe, int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0,
                       const int* dpos, float scale, uint16_t* out, cudaStream_t s);

// q [T, heads·hd]; cache rows [kv_heads][capacity][hd], positions 0..pos0+T-1
// written; hd in {64, 128, 256}, T >= 2.
bool attention_prefill_cache(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int64_t capacity, int T,
                             int heads, int kv_heads, int hd, int pos0, const int* dpos, float scale, uint16_t* out,
                             cudaStream_t s);

// Whether a one-token absorbed decode (k = v) of these shapes runs on
// tensor cores (read per call: ZMLX_CUDA_MLA_MMA=0 turns it off).
bool decode_on_tensor_cores(int heads, int kv_heads, int dk, int dr);

// scratch: T·heads·splits·(dv + 2) floats.
bool attention_decode(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe,
                      const uint16_t* k_pe, int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0,
                      const int* dpos, float scale, int splits, float* scratch, uint16_t* out, cudaStream_t s);

// x rows of ldx values, head h's input at column h·xoff (xoff = 0: shared);
// W = m: H stacked [R = m.rows, C = m.cols] matrices, quantized along C.
bool multi_linear_n(const uint16_t* x, int T, int64_t ldx, int64_t xoff, int H, const QMat& m, uint16_t* out,
                    cudaStream_t s);

// mla.cu's half of k::kernel_trace_arm.
void kernel_trace_arm(void* device_buf);

}  // namespace zmlx::cuda::mla
