// Multi-latent attention kernels (see mla.h for the contracts).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdlib>
#include <cmath>
#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/device_common.cuh"
#include "zmlx/backend/cuda/mla.h"

namespace zmlx::cuda::mla {
namespace {

using namespace zmlx::cuda::dev;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ------------------------------------------------------------ flash prefill

constexpr int kFK = 64;     // keys per tile
constexpr int kFMaxQK = 256;  // widest Q / K row (bf16): dk + dr <= 256
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory of a block of `warps` warps (16 queries each): the Q tile,
// one K tile and one V tile, rows of qkw (Q, K) and dv (V) bf16.
constexpr int flash_smem(int dv, int qkw, int warps) { return 16 * warps * qkw * 2 + kFK * qkw * 2 + kFK * dv * 2; }

// Block (query tile, head). Q tile rows = [q_nope (dk) | bf16(scale·q_pe) (dr)],
// K tile rows = [k_nope (dk) | k_pe (dr)], V tile rows = v (DV); QKW >= dk +
// dr is the tiles' row width, ROT says dr > 0.
//
// Where key j of kv group g lives: k + j·k_row + g·k_group (v likewise), so
// the same kernel reads MLA's expanded [T][kv heads][dk] keys and the GQA
// cache's [kv heads][capacity][hd] rows.
struct KvRows {
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_row, k_group, v_row, v_group;
};

// Blocks of 4 warps an SM the GQA kernel is held to (the register cap that
// follows): three for rows of up to 128 values (Qwen3's compile-time form:
// 185 registers uncapped, two blocks), four for rows of 64 (LFM2). The MLA
// forms' rotary accumulators would spill under those caps.
constexpr int flash_min_blocks(int dv, int qkw, bool rot, int warps) {
  return warps != 4 || rot ? 1 : qkw <= 64 && dv <= 64 ? 4 : qkw <= 128 && dv <= 128 ? 3 : 1;
}

// DK != 0 fixes dk at compile time (and dr = QKW - DK): the copy loops' row
// and chunk indices and the Q·Kᵀ steps are then constants, where the generic
// form (DK = 0, any dk / dr the tiles hold) divides by the chunk count in
// every copy. ncu on Qwen3's shapes (H200, 2026-11-29) had the generic form
// issuing ~12 instructions per MMA, its ALU pipe the busiest.
//
// Each step copies its K and V tiles at its top (V's copy overlapping Q·Kᵀ);
// blocks beside each other on the SM hide the copies. (A pipeline copying
// tile kt+1 during tile kt measured slower or level on every shape once the
// shapes were constants: docs/performance.md.) Every form (DK, WARPS) computes each
// query row's products in the same order, over the same key tiles: the same
// bits (tested).
//
// Blocks run heaviest first: block b takes head b % heads of query tile
// (tiles - 1 - b / heads), so the long causal rows start in the first wave
// and a kv group's heads (adjacent) read its tiles together, from L2. Only
// the tiles that reach past the block's first query are masked (a masked
// key's score is -inf either way).
template <int DV, int QKW, bool ROT, int DK, int WARPS>
__global__ void __launch_bounds__(32 * WARPS, flash_min_blocks(DV, QKW, ROT, WARPS))
    flash_pe_kernel(const uint16_t* q, KvRows kv, const uint16_t* q_pe, const uint16_t* k_pe, int T, int heads,
                    int kvh, int dk_arg, int dr_arg, int pos0, const int* dpos, float scale, uint16_t* out) {
  static_assert(DK == 0 || (DK % 16 == 0 && DK <= QKW && (ROT || DK == QKW)), "flash_pe_kernel: DK");
  constexpr int NT = 32 * WARPS, FQ = 16 * WARPS;
  static_assert(kFK * (DV / 8) % NT == 0, "flash_pe_kernel: the V copy loop has no bound check");
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sQ = smem;
  uint8_t* sK = sQ + FQ * QKW * 2;
  uint8_t* sV = sK + kFK * QKW * 2;
  constexpr int QKB = QKW * 2, VB = DV * 2;  // row bytes
  const int dk = DK ? DK : dk_arg, dr = DK ? QKW - DK : dr_arg;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int qtiles = int(gridDim.x) / heads;
  const int h = int(blockIdx.x) % heads, q0 = (qtiles - 1 - int(blockIdx.x) / heads) * FQ;
  const int g = h / (heads / kvh);
  const int p0 = dpos ? *dpos : pos0;
  const int nq = min(FQ, T - q0);
  const int qc = dk / 8, rc = ROT ? dr / 8 : 0, kc = qc + rc;  // 16-byte chunks per row

  // ---- Q tile (plain loads: q_pe is scaled and rounded on the way).
  for (int i = tid; i < FQ * kc; i += NT) {
    const int r = i / kc, c = i % kc;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < nq) {
      const int64_t t = q0 + r;
      if (c < qc) {
        val = *reinterpret_cast<const uint4*>(q + (t * heads + h) * dk + c * 8);
      } else {
        const uint4 raw = *reinterpret_cast<const uint4*>(q_pe + (t * heads + h) * dr + (c - qc) * 8);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = pack_bf2(scale * lo_bf(w[j]), scale * hi_bf(w[j]));
        val = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
    *reinterpret_cast<uint4*>(sQ + swz(r, c, QKB)) = val;
  }

  const int last_key = p0 + q0 + nq - 1;  // the tile's last query sees keys 0..last_key
  const int ntiles = last_key / kFK + 1;
  const int open_tiles = (p0 + q0 + 1) / kFK;  // tiles wholly at or before the first query

  const uint32_t aQ = smem_addr(sQ), aK = smem_addr(sK), aV = smem_addr(sV);
  const uint16_t* kg = kv.k + g * kv.k_group;
  const uint16_t* vg = kv.v + g * kv.v_group;
  auto load_k = [&](int kt) {
    const int j0 = kt * kFK;
#pragma unroll
    for (int it = 0; it < (kFK * kc + NT - 1) / NT; ++it) {
      const int i = tid + it * NT;
      if (i >= kFK * kc) break;
      const int r = i / kc, c = i % kc, j = j0 + r;
      const bool ok = j <= last_key;
      const uint16_t* src = c < qc ? kg + (ok ? j * kv.k_row + c * 8 : 0)
                                   : k_pe + (ok ? int64_t(j) * dr + (c - qc) * 8 : 0);
      cp_async16(aK + swz(r, c, QKB), src, ok);
    }
    cp_async_commit();
  };
  auto load_v = [&](int kt) {
    const int j0 = kt * kFK;
#pragma unroll
    for (int it = 0; it < kFK * (DV / 8) / NT; ++it) {
      const int i = tid + it * NT;
      const int r = i / (DV / 8), c = i % (DV / 8), j = j0 + r;
      const bool ok = j <= last_key;
      cp_async16(aV + swz(r, c, VB), vg + (ok ? j * kv.v_row + c * 8 : 0), ok);
    }
    cp_async_commit();
  };

  float o_acc[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DV / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[n][e] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const int qrow = warp * 16 + (lane >> 2);  // this thread's rows: qrow, qrow + 8
  const int qpos[2] = {p0 + q0 + qrow, p0 + q0 + qrow + 8};

  for (int kt = 0; kt < ntiles; ++kt) {
    const int j0 = kt * kFK;
    load_k(kt);
    load_v(kt);
    cp_async_wait<1>();  // K tile kt (V tile kt may still be coming)
    __syncthreads();

    // ---- S = Q Kᵀ (nope part and rotary part kept apart: the reference
    // rounds the rotary dot to bf16 before adding).
    float s_n[kFK / 8][4], s_r[ROT ? kFK / 8 : 1][4];
#pragma unroll
    for (int n = 0; n < kFK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s_n[n][e] = 0.f;
    if (ROT)
#pragma unroll
      for (int n = 0; n < kFK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s_r[ROT ? n : 0][e] = 0.f;
    const int arow = warp * 16 + (lane & 15);
#pragma unroll
    for (int kk = 0; kk < (DK ? QKW / 16 : qc / 2 + rc / 2); ++kk) {
      uint32_t a[4], b[kFK / 16][4];
      ldmatrix_x4(a, aQ + swz(arow, kk * 2 + (lane >> 4), QKB));
      const bool rot = ROT && kk >= qc / 2;
      // Every B fragment of the step first, then the products: the loads are
      // in flight together (one after another, each product waited for its own).
#pragma unroll
      for (int p = 0; p < kFK / 16; ++p)
        ldmatrix_x4(b[p], aK + swz(p * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1), QKB));
#pragma unroll
      for (int p = 0; p < kFK / 16; ++p) {
        if (rot) {
          mma_bf16(s_r[ROT ? 2 * p : 0], a, b[p][0], b[p][1]);
          mma_bf16(s_r[ROT ? 2 * p + 1 : 0], a, b[p][2], b[p][3]);
        } else {
          mma_bf16(s_n[2 * p], a, b[p][0], b[p][1]);
          mma_bf16(s_n[2 * p + 1], a, b[p][2], b[p][3]);
        }
      }
    }

    // ---- online softmax (rows qrow, qrow + 8; a quad of lanes shares a row)
#pragma unroll
    for (int n = 0; n < kFK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s_n[n][e] = ROT ? s_n[n][e] * scale + rbf(s_r[ROT ? n : 0][e]) : s_n[n][e] * scale;
    if (kt >= open_tiles)
#pragma unroll
      for (int n = 0; n < kFK / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (j0 + n * 8 + (lane & 3) * 2 + (e & 1) > qpos[e >> 1]) s_n[n][e] = -INFINITY;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < kFK / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s_n[n][e]);
    float corr[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
      // mx is finite: key 0 <= every query's position, and tile 0 comes first.
      corr[hr] = exp2f((m_run[hr] - mx[hr]) * kLog2e);
      m_run[hr] = mx[hr];
      l_run[hr] *= corr[hr];
    }
    // corr is exactly 1 for a row whose max did not move, and x·1 = x: a
    // warp whose rows all kept their max skips the rescale (the same bits).
    // Rows of up to 128 values (H200, flash_prefill_bench: Qwen3 +1.7 %, LFM2
    // +2.8 %); GLM's 256-wide form spilled with the branch and lost 0.5 %.
    if (DV > 128 || __any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f))
#pragma unroll
      for (int n = 0; n < DV / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o_acc[n][e] *= corr[e >> 1];
    uint32_t pa[kFK / 16][4];  // P as the A operand of PV, bf16
#pragma unroll
    for (int n = 0; n < kFK / 8; ++n) {
      float pr[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pr[e] = exp2f((s_n[n][e] - mx[e >> 1]) * kLog2e);
        l_run[e >> 1] += pr[e];
      }
      pa[n / 2][(n & 1) * 2] = pack_bf2(pr[0], pr[1]);
      pa[n / 2][(n & 1) * 2 + 1] = pack_bf2(pr[2], pr[3]);
    }

    cp_async_wait<0>();  // V tile kt
    __syncthreads();
    // ---- O += P V
#pragma unroll
    for (int kk = 0; kk < kFK / 16; ++kk) {
      const int vrow = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int pb = 0; pb < DV / 16; pb += 4) {  // four column pairs a batch
        uint32_t b[4][4];  // four fragments loaded, then their products (as above)
#pragma unroll
        for (int i = 0; i < 4; ++i) ldmatrix_x4_trans(b[i], aV + swz(vrow, (pb + i) * 2 + (lane >> 4), VB));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          mma_bf16(o_acc[2 * (pb + i)], pa[kk], b[i][0], b[i][1]);
          mma_bf16(o_acc[2 * (pb + i) + 1], pa[kk], b[i][2], b[i][3]);
        }
      }
    }
    __syncthreads();  // every warp is done with sK and sV
  }

  // ---- normalize and store
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 1);
    l_run[hr] += __shfl_xor_sync(0xffffffffu, l_run[hr], 2);
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = qrow + hr * 8;
    if (r >= nq) continue;
    const float inv = 1.0f / l_run[hr];
    uint16_t* o = out + (int64_t(q0 + r) * heads + h) * DV + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < DV / 8; ++n)
      *reinterpret_cast<uint32_t*>(o + n * 8) = pack_bf2(o_acc[n][hr * 2] * inv, o_acc[n][hr * 2 + 1] * inv);
  }
}

struct FlashArgs {
  const uint16_t* q;
  KvRows kv;
  const uint16_t *q_pe, *k_pe;
  int T, heads, kvh, dk, dr, pos0;
  const int* dpos;
  float scale;
  uint16_t* out;
};

template <int DV, int QKW, bool ROT, int DK, int WARPS>
void launch_flash(const FlashArgs& a, cudaStream_t s) {
  constexpr int smem = flash_smem(DV, QKW, WARPS);
  auto* kernel = flash_pe_kernel<DV, QKW, ROT, DK, WARPS>;
  // Over 48 KiB of dynamic shared memory needs the opt-in.
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
  const unsigned blocks = unsigned((a.T + 16 * WARPS - 1) / (16 * WARPS)) * unsigned(a.heads);
  kernel<<<blocks, 32 * WARPS, smem, s>>>(a.q, a.kv, a.q_pe, a.k_pe, a.T, a.heads, a.kvh, a.dk, a.dr, a.pos0,
                                          a.dpos, a.scale, a.out);
}

// The Q / K tiles' row width for these shapes: GQA rows as wide as the
// head; MLA rows 128 wide where dv is 128 and dk + dr fit, else 256.
int flash_tile_width(int dv, int dk, int dr) { return dr == 0 ? dk : dv == 128 && dk + dr <= 128 ? 128 : kFMaxQK; }

// The shapes with a compile-time form (their dk; 0: none): GQA heads of 64,
// 128 and 256, GLM-4.7-Flash's 192 + 64 | 256.
int flash_fixed_dk(int dv, int dk, int dr) {
  if (dr == 0) return dv == dk && (dk == 64 || dk == 128 || dk == 256) ? dk : 0;
  return dv == 256 && dk == 192 && dr == 64 ? 192 : 0;
}

// Launches the form f (from flash_form) of the kernel for these shapes.
template <int DV, int QKW, bool ROT, int DK>
void launch_flash_form(const FlashArgs& a, FlashForm f, cudaStream_t s) {
  if (DK == 0 || f.dk != DK) {
    if (f.warps == 8) launch_flash<DV, QKW, ROT, 0, 8>(a, s);
    else launch_flash<DV, QKW, ROT, 0, 4>(a, s);
    return;
  }
  if constexpr (DK != 0) {
    if (f.warps == 8) launch_flash<DV, QKW, ROT, DK, 8>(a, s);
    else launch_flash<DV, QKW, ROT, DK, 4>(a, s);
  }
}

// GQA prefill (no rotary part): hd in {64, 128, 256} (attention_prefill_cache
// takes no other).
void launch_flash_gqa(int hd, const FlashArgs& a, FlashForm f, cudaStream_t s) {
  switch (hd) {
    case 64: launch_flash_form<64, 64, false, 64>(a, f, s); break;
    case 128: launch_flash_form<128, 128, false, 128>(a, f, s); break;
    case 256: launch_flash_form<256, 256, false, 256>(a, f, s); break;
  }
}

// MLA prefill (a rotary part): dv in {64, 128, 256}, Q / K rows of dk + dr
// <= 256 values (flash_tile_width).
void launch_flash_mla(int dv, const FlashArgs& a, FlashForm f, cudaStream_t s) {
  if (flash_fixed_dk(dv, a.dk, a.dr) == 192) return launch_flash_form<256, 256, true, 192>(a, f, s);  // GLM
  if (flash_tile_width(dv, a.dk, a.dr) == 128) return launch_flash_form<128, 128, true, 0>(a, f, s);
  switch (dv) {
    case 64: launch_flash_form<64, kFMaxQK, true, 0>(a, f, s); break;
    case 128: launch_flash_form<128, kFMaxQK, true, 0>(a, f, s); break;
    default: launch_flash_form<256, kFMaxQK, true, 0>(a, f, s); break;
  }
}

// ------------------------------------------------------------ decode partials

constexpr int kDW = 4;  // warps per block
constexpr int kDG = 4;  // keys per warp step

template <int N>
__device__ __forceinline__ void load8s(const uint16_t* p, uint32_t (&w)[N]) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
    w[4 * i] = u.x, w[4 * i + 1] = u.y, w[4 * i + 2] = u.z, w[4 * i + 3] = u.w;
  }
}

// One (head, split, token): lane owns dims lane·PL..+PL of q·k and of the
// output (PL = dk / 32, 8 or 16: one or two 16-byte loads), and RL = dr / 32
// rotary dims. SAME: v == k, the value row is the key row already loaded.
template <int PL, int RL, bool SAME>
__global__ void __launch_bounds__(kDW * 32) pe_decode_kernel(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                                             const uint16_t* q_pe, const uint16_t* k_pe, int heads,
                                                             int kvh, int pos0, const int* dpos, float scale,
                                                             int splits, float* scratch, bool prefetch) {
  ZMLX_TRACE_BLOCK_END();
  constexpr int D = 32 * PL, DR = 32 * RL;
  const int h = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The position comes from the host or from the recorded step's first
  // node (a copy), not from the previous kernel: read before the wait.
  const int p0 = dpos ? *dpos : pos0;
  const int visible = p0 + t + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, j1 = min(visible, j0 + chunk);
  const int g = h / (heads / kvh);
  // The split's rows written by earlier steps (before p0) to L2 before the
  // wait, as attn_partial_kernel does: whole rows (every kv head's), by the
  // first head's block.
  if (prefetch && threadIdx.x == 0 && t == 0 && h == 0) {
    const int je = min(j1, p0);
    prefetch_rows_l2(k, int64_t(kvh) * D, j0, je);
    if (!SAME) prefetch_rows_l2(v, int64_t(kvh) * D, j0, je);
    prefetch_rows_l2(k_pe, DR, j0, je);
  }
  pdl_begin();
  float qv[PL], qs[RL];
  {
    uint32_t w[PL / 2];
    load8s<PL / 2>(q + (int64_t(t) * heads + h) * D + lane * PL, w);
#pragma unroll
    for (int i = 0; i < PL / 2; ++i) qv[2 * i] = lo_bf(w[i]), qv[2 * i + 1] = hi_bf(w[i]);
    const uint16_t* qp = q_pe + (int64_t(t) * heads + h) * DR + lane * RL;
#pragma unroll
    for (int i = 0; i < RL; ++i) qs[i] = rbf(scale * bf(qp[i]));
  }
  const int64_t ks = int64_t(kvh) * D;
  const uint16_t* K = k + int64_t(g) * D + lane * PL;
  const uint16_t* V = v + int64_t(g) * D + lane * PL;
  const uint16_t* KP = k_pe + lane * RL;
  float m = -FLT_MAX, l = 0.f, acc[PL];
#pragma unroll
  for (int d = 0; d < PL; ++d) acc[d] = 0.f;
  for (int j = j0 + warp; j < j1; j += kDW * kDG) {
    uint32_t kw[kDG][PL / 2];
    uint32_t pw[kDG];
#pragma unroll
    for (int u = 0; u < kDG; ++u) {
      const int ju = j + u * kDW;
      if (ju < j1) {
        load8s<PL / 2>(K + ju * ks, kw[u]);
        if constexpr (RL == 2) pw[u] = __ldg(reinterpret_cast<const uint32_t*>(KP + int64_t(ju) * DR));
        else pw[u] = __ldg(KP + int64_t(ju) * DR);
      } else {
#pragma unroll
        for (int i = 0; i < PL / 2; ++i) kw[u][i] = 0u;
        pw[u] = 0u;
      }
    }
    float sc[kDG], pe[kDG];
#pragma unroll
    for (int u = 0; u < kDG; ++u) {
      sc[u] = 0.f;
#pragma unroll
      for (int i = 0; i < PL / 2; ++i) {
        sc[u] = fmaf(qv[2 * i], lo_bf(kw[u][i]), sc[u]);
        sc[u] = fmaf(qv[2 * i + 1], hi_bf(kw[u][i]), sc[u]);
      }
      pe[u] = qs[0] * lo_bf(pw[u]);
      if constexpr (RL == 2) pe[u] = fmaf(qs[1], hi_bf(pw[u]), pe[u]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int u = 0; u < kDG; ++u) {
        sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
        pe[u] += __shfl_xor_sync(0xffffffffu, pe[u], o);
      }
    float mn = m;
#pragma unroll
    for (int u = 0; u < kDG; ++u) {
      sc[u] = j + u * kDW < j1 ? sc[u] * scale + rbf(pe[u]) : -INFINITY;
      mn = fmaxf(mn, sc[u]);
    }
    const float corr = expf(m - mn);
    l *= corr;
#pragma unroll
    for (int d = 0; d < PL; ++d) acc[d] *= corr;
#pragma unroll
    for (int u = 0; u < kDG; ++u) {
      const int ju = j + u * kDW;
      if (ju >= j1) break;
      const float p = expf(sc[u] - mn);
      l += p;
      uint32_t vw[PL / 2];
      if constexpr (SAME) {
#pragma unroll
        for (int i = 0; i < PL / 2; ++i) vw[i] = kw[u][i];
      } else {
        load8s<PL / 2>(V + ju * ks, vw);
      }
#pragma unroll
      for (int i = 0; i < PL / 2; ++i) {
        acc[2 * i] = fmaf(p, lo_bf(vw[i]), acc[2 * i]);
        acc[2 * i + 1] = fmaf(p, hi_bf(vw[i]), acc[2 * i + 1]);
      }
    }
    m = mn;
  }
  __shared__ float sm[kDW], sl[kDW], sacc[kDW][D];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
#pragma unroll
  for (int d = 0; d < PL; ++d) sacc[warp][lane * PL + d] = acc[d];
  __syncthreads();
  store_split_partial(sm, sl, sacc, D, scratch + ((int64_t(t) * heads + h) * splits + s) * (D + 2));
}

// ------------------------------------------------------------ decode partials on tensor cores

// One token's absorbed attention over a split of the latent cache for a
// tile of NT·8 heads (blockIdx.y; GLM-4.7-Flash: kv_heads = 1, k = v, 512
// latent + 64 rotary dims). The heads are the N dimension of m16n8k16
// tiles, 8 a tile (20 heads: 24 columns, where heads as M rows pad to 32):
//   Sᵀ[row][head] = K[row]·Q[head] (the latent and rotary parts in separate
//   accumulators: the reference rounds the rotary dot to bf16 before adding),
//   Oᵀ[dim][head] += Vᵀ[dim][row]·Pᵀ[row][head] with P rounded to bf16 (as
//   the flash prefill kernel and the grouped GQA kernel do).
// A step takes kPmRows cache rows [latent | rotary] into shared memory:
// the split's first step's old rows (j < p0) with cp.async before the
// wait, the rest after it. DB (splits of several steps where a block an SM
// fits either way): two step buffers, step i + 1 copied while step i is
// computed (step 1 right after the wait); the same arithmetic in the same
// order, so the same bits. The 8 warps:
//   scores: warp = (16-row tile w % 4, k half w / 4); the second half's
//     18 k-steps hold the 4 rotary ones;
//   softmax: warp w owns heads w, w + 8, ... (running max and sum in
//     registers; P and the correction into shared memory);
//   P·V: warp w owns latent dims 64w..64w+63 (4 M tiles) of every head.
// The partial goes to scratch in store_split_partial's layout (M, L, o[D]).
// Trace marks (the last step's): 0 q and the first step's rows in shared
// memory, 3 the scores, 1 P, 2 the partial stored.
constexpr int kPmWarps = 8;
constexpr int kPmRows = 64;                // cache rows a step
constexpr int kPmD = 512, kPmDR = 64;      // latent and rotary widths
constexpr int kPmRB = (kPmD + kPmDR) * 2;  // bytes of a [latent | rotary] row in shared memory
constexpr int kPmCH = kPmRB / 16;          // its 16-byte chunks
constexpr int kPmSS = kPmRows + 4;         // floats a head's score row

// Shared memory of a block of NT head tiles: q rows, a step's cache rows
// (two steps' with double buffering), the scores (two latent halves,
// rotary), P, the corrections.
constexpr size_t pe_mma_smem(int nt, bool db = false) {
  const size_t HP = size_t(nt) * 8;
  return HP * kPmRB + size_t(db ? 2 : 1) * kPmRows * kPmRB + 3 * HP * kPmSS * 4 + HP * kPmRows * 2 + HP * 4;
}

// k-steps [KB, KE) of Sᵀ for the 16 cache rows at m0: A = the rows (K),
// B = the heads' q rows, NT tiles of 8.
template <int NT, int KB, int KE>
__device__ __forceinline__ void pe_mma_scores(uint32_t aK, uint32_t aQ, int m0, int lane, float (&acc)[NT][4]) {
#pragma unroll
  for (int kk = KB; kk < KE; kk += 2) {
    uint32_t a0[4], a1[4];
    ldmatrix_x4(a0, aK + swz(m0 + (lane & 15), kk * 2 + (lane >> 4), kPmRB));
    ldmatrix_x4(a1, aK + swz(m0 + (lane & 15), kk * 2 + 2 + (lane >> 4), kPmRB));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b[4];  // this tile's heads at k-steps kk and kk + 1
      ldmatrix_x4(b, aQ + swz(nt * 8 + (lane & 7), kk * 2 + (lane >> 3), kPmRB));
      mma_bf16(acc[nt], a0, b[0], b[1]);
      mma_bf16(acc[nt], a1, b[2], b[3]);
    }
  }
}

template <int NT, bool DB = false>
__global__ void __launch_bounds__(kPmWarps * 32, 1)
    pe_decode_mma_kernel(const uint16_t* q, const uint16_t* kc, const uint16_t* q_pe, const uint16_t* k_pe,
                         int all_heads, int pos0, const int* dpos, float scale, int splits, float* scratch) {
  ZMLX_TRACE_BLOCK_END();
  constexpr int HP = NT * 8;
  // This block's heads: h0.. (blockIdx.y's tile of HP).
  const int h0 = blockIdx.y * HP, heads = min(all_heads - h0, HP);
  q += int64_t(h0) * kPmD, q_pe += int64_t(h0) * kPmDR, scratch += int64_t(h0) * splits * (kPmD + 2);
  extern __shared__ __align__(128) uint8_t pm_smem[];
  uint8_t* sQ = pm_smem;
  uint8_t* sK = sQ + HP * kPmRB;
  float* sN0 = reinterpret_cast<float*>(sK + (DB ? 2 : 1) * kPmRows * kPmRB);  // latent scores, first k half
  float* sN1 = sN0 + HP * kPmSS;                                  // second k half
  float* sR = sN1 + HP * kPmSS;                                   // rotary scores
  uint8_t* sP = reinterpret_cast<uint8_t*>(sR + HP * kPmSS);      // [head][row] bf16, 128-byte rows
  float* sCorr = reinterpret_cast<float*>(sP + HP * kPmRows * 2);
  const int s = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int p0 = dpos ? *dpos : pos0;  // from the host or the step's first node: read before the wait
  const int visible = p0 + 1;
  const int chunk = (visible + splits - 1) / splits;
  const int j0 = s * chunk, n = max(min(visible, j0 + chunk) - j0, 0);
  const uint32_t aQ = smem_addr(sQ), aK = smem_addr(sK), aP = smem_addr(sP);

  // The split's cache rows [base, base + rows) at positions below jhi into
  // the step buffer at aKb; the rows after them to the 16-row end
  // zero-filled (P is 0 there, but 0·V must not meet stale NaNs).
  auto chunk_src = [&](int j, int c) {
    return c < kPmD / 8 ? kc + int64_t(j) * kPmD + c * 8 : k_pe + int64_t(j) * kPmDR + (c - kPmD / 8) * 8;
  };
  auto stage = [&](uint32_t aKb, int base, int rows, int jhi) {
    const int fill = (rows + 15) / 16 * 16 * kPmCH;
    for (int i = tid; i < fill; i += blockDim.x) {
      const int r = i / kPmCH, c = i % kPmCH, j = j0 + base + r;
      if (r >= rows) cp_async16(aKb + swz(r, c, kPmRB), kc, false);
      else if (j < jhi) cp_async16(aKb + swz(r, c, kPmRB), chunk_src(j, c), true);
    }
  };
  auto step_buffer = [&](int step) { return aK + uint32_t(DB ? (step & 1) * kPmRows * kPmRB : 0); };
  stage(aK, 0, min(n, kPmRows), p0);  // the old rows
  cp_async_commit();
  for (int i = tid; i < (HP - heads) * kPmCH; i += blockDim.x)  // the padding heads' q rows
    *reinterpret_cast<uint4*>(sQ + swz(heads + i / kPmCH, i % kPmCH, kPmRB)) = make_uint4(0u, 0u, 0u, 0u);
  for (int i = tid; i < HP * kPmRows / 8; i += blockDim.x)  // P's padding heads stay 0
    *reinterpret_cast<uint4*>(sP + i * 16) = make_uint4(0u, 0u, 0u, 0u);
  for (int i = tid; i < HP; i += blockDim.x) sCorr[i] = 0.f;

  pdl_begin();
  // After the wait: the heads' q rows (the latent part copied, the rotary
  // part scaled and rounded to bf16 as the reference does) and, in the
  // split holding it, the new row p0 if it is in the first step.
  for (int i = tid; i < heads * (kPmD / 8); i += blockDim.x) {
    const int h = i / (kPmD / 8), c = i % (kPmD / 8);
    cp_async16(aQ + swz(h, c, kPmRB), q + int64_t(h) * kPmD + c * 8, true);
  }
  if (p0 >= j0 && p0 < j0 + min(n, kPmRows))
    for (int c = tid; c < kPmCH; c += blockDim.x) cp_async16(aK + swz(p0 - j0, c, kPmRB), chunk_src(p0, c), true);
  cp_async_commit();
  if (tid < heads * (kPmDR / 8)) {
    const int h = tid / (kPmDR / 8), c = tid % (kPmDR / 8);
    const uint4 raw = *reinterpret_cast<const uint4*>(q_pe + int64_t(h) * kPmDR + c * 8);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    uint32_t o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = pack_bf2(rbf(scale * lo_bf(w[j])), rbf(scale * hi_bf(w[j])));
    *reinterpret_cast<uint4*>(sQ + swz(h, kPmD / 8 + c, kPmRB)) = make_uint4(o[0], o[1], o[2], o[3]);
  }
  if constexpr (DB) {  // step 1 (an empty group when the split has one step)
    if (n > kPmRows) stage(step_buffer(1), kPmRows, min(kPmRows, n - kPmRows), visible);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  ZMLX_TRACE_MARK(0);  // trace: q and the first step's rows in shared memory

  float m_run[NT], l_run[NT];  // of heads warp + 8i (the softmax owner's)
#pragma unroll
  for (int i = 0; i < NT; ++i) m_run[i] = -FLT_MAX, l_run[i] = 0.f;
  float o[4][NT][4];  // Oᵀ: dims 64·warp + 16i.., the NT head tiles
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][nt][e] = 0.f;

  for (int base = 0, step = 0; base < n; base += kPmRows, ++step) {
    const int rows = min(kPmRows, n - base);
    const uint32_t aKs = step_buffer(step);
    if (base > 0) {  // a later step: every row after the wait
      if constexpr (DB) {
        cp_async_wait<0>();  // this step's rows (copied during the last one)
        __syncthreads();     // ... and the last step's P·V is done with its buffer: the next step's
        if (base + kPmRows < n)
          stage(step_buffer(step + 1), base + kPmRows, min(kPmRows, n - base - kPmRows), visible);
        cp_async_commit();
      } else {
        __syncthreads();  // the previous step's P·V is done with sK and sP
        stage(aK, base, rows, visible);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
    }
    {  // scores
      const int mt = warp & 3, kh = warp >> 2;
      if (mt * 16 < rows) {
        float sn[NT][4] = {}, sr[NT][4] = {};
        constexpr int KL = kPmD / 16, KH = (kPmD + kPmDR) / 32;  // latent k-steps (32), a half's (18)
        if (kh == 0) {
          pe_mma_scores<NT, 0, KH>(aKs, aQ, mt * 16, lane, sn);
        } else {
          pe_mma_scores<NT, KH, KL>(aKs, aQ, mt * 16, lane, sn);
          pe_mma_scores<NT, KL, KL + kPmDR / 16>(aKs, aQ, mt * 16, lane, sr);
        }
        float* dst = kh == 0 ? sN0 : sN1;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = nt * 8 + (lane & 3) * 2 + (e & 1), r = mt * 16 + (lane >> 2) + (e >> 1) * 8;
            dst[h * kPmSS + r] = sn[nt][e];
            if (kh == 1) sR[h * kPmSS + r] = sr[nt][e];
          }
      }
    }
    __syncthreads();
    ZMLX_TRACE_MARK(3);  // trace: the step's scores in shared memory
    // Softmax: lane's rows 2·lane, 2·lane + 1 of each owned head.
    // No early exit for the warps' missing heads: the NT heads' shuffle
    // chains stay independent, so they overlap.
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int h = warp + 8 * i;
      const bool live = h < heads;
      float sv[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 2 * lane + e;
        sv[e] = live && r < rows ? (sN0[h * kPmSS + r] + sN1[h * kPmSS + r]) * scale + rbf(sR[h * kPmSS + r])
                                 : -INFINITY;
      }
      const float mn = fmaxf(m_run[i], warp_max(fmaxf(sv[0], sv[1])));
      const float corr = expf(m_run[i] - mn);
      const float pa = expf(sv[0] - mn), pb = expf(sv[1] - mn);
      l_run[i] = l_run[i] * corr + warp_sum(pa + pb);
      m_run[i] = mn;
      if (live) {
        *reinterpret_cast<uint32_t*>(sP + swz(h, lane >> 2, kPmRows * 2) + (lane & 3) * 4) = pack_bf2(pa, pb);
        if (lane == 0) sCorr[h] = corr;
      }
    }
    __syncthreads();
    ZMLX_TRACE_MARK(1);  // trace: the step's P in shared memory
    {  // P·V
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float ca = sCorr[nt * 8 + (lane & 3) * 2], cb = sCorr[nt * 8 + (lane & 3) * 2 + 1];
#pragma unroll
        for (int i = 0; i < 4; ++i) o[i][nt][0] *= ca, o[i][nt][1] *= cb, o[i][nt][2] *= ca, o[i][nt][3] *= cb;
      }
      const int ksteps = (rows + 15) / 16;
#pragma unroll
      for (int ks = 0; ks < kPmRows / 16; ks += 2) {
        if (ks >= ksteps) break;
        uint32_t b[NT][4];  // Pᵀ at k-steps ks, ks + 1
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(b[nt], aP + swz(nt * 8 + (lane & 7), ks * 2 + (lane >> 3), kPmRows * 2));
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          if (ks + u >= ksteps) break;
          const int vrow = (ks + u) * 16 + (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t a[4];  // Vᵀ: dims warp·64 + 16i.., rows of this k-step
            ldmatrix_x4_trans(a, aKs + swz(vrow, warp * 8 + i * 2 + ((lane >> 3) & 1), kPmRB));
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mma_bf16(o[i][nt], a, b[nt][2 * u], b[nt][2 * u + 1]);
          }
        }
      }
    }
  }

  // The partial: (M, L) by the heads' softmax owners, o by the P·V warps.
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int h = warp + 8 * i;
    if (h < heads && lane == 0) {
      float* out = scratch + (int64_t(h) * splits + s) * (kPmD + 2);
      out[0] = m_run[i], out[1] = l_run[i];
    }
  }
  {
    // o through shared memory (sK's space, free once every warp is past its
    // last P·V): [head][kPmD + 4] floats, then rows of float2 stores (stored
    // straight from the fragments, 4-byte pieces a head apart, the kernel
    // took 0.6 us longer).
    constexpr int OS = kPmD + 4;
    float* sO = reinterpret_cast<float*>(sK);
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = nt * 8 + (lane & 3) * 2 + (e & 1);
#pragma unroll
        for (int i = 0; i < 4; ++i) sO[h * OS + warp * 64 + i * 16 + (lane >> 2) + (e >> 1) * 8] = o[i][nt][e];
      }
    __syncthreads();
    for (int i = tid; i < heads * (kPmD / 2); i += blockDim.x) {
      const int h = i / (kPmD / 2), c = i % (kPmD / 2) * 2;
      *reinterpret_cast<float2*>(scratch + (int64_t(h) * splits + s) * (kPmD + 2) + 2 + c) =
          *reinterpret_cast<const float2*>(sO + h * OS + c);
    }
  }
  ZMLX_TRACE_MARK(2);  // trace: the partial stored
}

// ------------------------------------------------------------ multi_linear (no transpose)

constexpr int kMT = 64;  // tokens per block
constexpr int kMC = 64;  // output columns per block
constexpr int kMR = 64;  // reduction rows per step

// Block (token tile, column tile, head); 4 warps as 2 (tokens) x 2 (columns),
// each 32 x 32. Per step: the x tile [64 t][64 r] and the dequantized weight
// tile [64 r][64 c] go to shared memory (double-buffered, the next step's
// global loads in flight during this step's MMAs); B fragments come from
// the [r][c] tile through ldmatrix.trans.
template <int BITS>
__global__ void __launch_bounds__(128) multi_linear_n_mma_kernel(const uint16_t* x, int64_t ldx, int64_t xoff, int T,
                                                                 QMat m, uint16_t* out) {
  __shared__ __align__(128) uint8_t sA[2][kMT * kMR * 2];
  __shared__ __align__(128) uint8_t sB[2][kMR * kMC * 2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int t0 = blockIdx.x * kMT, c0 = blockIdx.y * kMC, h = blockIdx.z;
  const int64_t R = m.rows, C = m.cols, H = gridDim.z;
  const int nk = int((R + kMR - 1) / kMR);
  const uint16_t* xh = x + h * xoff;

  // x: 4 chunks per thread (rows tid/8 + 16i, chunk tid%8).
  uint4 xa[4];
  auto load_x = [&](int kt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (tid >> 3) + 16 * i, c = tid & 7;
      const int64_t t = t0 + r, rr = int64_t(kt) * kMR + c * 8;
      xa[i] = t < T && rr < R ? *reinterpret_cast<const uint4*>(xh + t * ldx + rr) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // W: row wr = tid/2 of the step, 32 columns (c0 + 32·(tid&1)): BITS words.
  const int wr = tid >> 1, wh = tid & 1;
  const int64_t col = c0 + 32 * wh;
  const bool col_ok = col < C;
  const int64_t wpr = C * BITS / 32, gpr = BITS == 16 ? 0 : C / m.group;
  uint32_t ww[BITS];
  uint16_t wsc = 0, wbi = 0;
  auto load_w = [&](int kt) {
    const int64_t r = int64_t(kt) * kMR + wr;
    const bool ok = col_ok && r < R;
    const int64_t row = h * R + r;
    if (ok) {
      const uint32_t* p = m.w + row * wpr + col * BITS / 32;
      if constexpr (BITS == 2) {
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
        ww[0] = u.x, ww[1] = u.y;
      } else {
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) {
          const uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + i);
          ww[4 * i] = u.x, ww[4 * i + 1] = u.y, ww[4 * i + 2] = u.z, ww[4 * i + 3] = u.w;
        }
      }
      if constexpr (BITS != 16) {
        wsc = __ldg(m.scales + row * gpr + col / m.group);
        wbi = __ldg(m.biases + row * gpr + col / m.group);
      }
    } else {
#pragma unroll
      for (int i = 0; i < BITS; ++i) ww[i] = 0u;
      wsc = 0, wbi = 0;
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = (tid >> 3) + 16 * i, c = tid & 7;
      *reinterpret_cast<uint4*>(sA[buf] + swz(r, c, 128)) = xa[i];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t o[4];
      if constexpr (BITS == 16) {
#pragma unroll
        for (int v = 0; v < 4; ++v) o[v] = ww[4 * j + v];
      } else {
        constexpr int per = 32 / BITS;
        constexpr uint32_t mask = (1u << BITS) - 1u;
        const float s = bf(wsc), b = bf(wbi);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float f[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = j * 8 + v * 2 + e;
            const uint32_t qv = (ww[i / per] >> (BITS * (i % per))) & mask;
            f[e] = __fmaf_rn(s, __uint_as_float(0x4B000000u | qv) - 8388608.0f, b);  // exact int -> float
          }
          o[v] = pack_bf2(f[0], f[1]);
        }
      }
      *reinterpret_cast<uint4*>(sB[buf] + swz(wr, wh * 4 + j, 128)) = make_uint4(o[0], o[1], o[2], o[3]);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  load_x(0);
  load_w(0);
  store(0);
  __syncthreads();
  for (int kt = 0; kt < nk; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < nk) load_x(kt + 1), load_w(kt + 1);
    const uint32_t a_base = smem_addr(sA[buf]), b_base = smem_addr(sB[buf]);
#pragma unroll
    for (int kk = 0; kk < kMR / 16; ++kk) {
      uint32_t af[2][4], bfr[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) ldmatrix_x4(af[i], a_base + swz(wm * 32 + i * 16 + (lane & 15), kk * 2 + (lane >> 4), 128));
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, b_base + swz(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, wn * 4 + p * 2 + (lane >> 4), 128));
        bfr[2 * p][0] = b[0], bfr[2 * p][1] = b[1], bfr[2 * p + 1][0] = b[2], bfr[2 * p + 1][1] = b[3];
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_bf16(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
    }
    if (kt + 1 < nk) store(buf ^ 1);
    __syncthreads();
  }

  const int gr = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t t = t0 + wm * 32 + i * 16 + gr + hh * 8;
      if (t >= T) continue;
      uint16_t* o = out + (t * H + h) * C;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c0 + wn * 32 + j * 8 + c2;
        if (c < C) *reinterpret_cast<uint32_t*>(o + c) = pack_bf2(acc[i][j][hh * 2], acc[i][j][hh * 2 + 1]);
      }
    }
}

}  // namespace

// The form: compile-time dk where the shapes have one (flash_fixed_dk),
// blocks of 8 warps (128 queries) for rows of 256 values, else 4 — as far as
// the card's shared memory allows (an sm_86 / sm_89 card's 99 KiB takes
// GLM's rows in 4-warp blocks: 96 KiB against 128). One H200, 2026-11-29
// (docs/performance.md, flash_prefill_bench, a pass of 4,096 after 28,672
// positions): GLM's rows 212.5 TFLOPS with 4 warps, 232.7 with 8; Qwen3's
// 253.8 with 4, 229.1 with 8. ZMLX_CUDA_FLASH_GENERIC=1: the run-time-shape
// form; ZMLX_CUDA_FLASH_WARPS=4 / 8: that block width where it fits. Read per
// call (A/B runs and the tests; the same bits every way).
FlashForm flash_form(int dv, int dk, int dr) {
  const int qkw = flash_tile_width(dv, dk, dr);
  FlashForm f;
  f.dk = zmlx::cuda::env_is("ZMLX_CUDA_FLASH_GENERIC", "1") ? 0 : flash_fixed_dk(dv, dk, dr);
  const bool wide = zmlx::cuda::env_is("ZMLX_CUDA_FLASH_WARPS", "8") ||
                    (dv >= 256 && !zmlx::cuda::env_is("ZMLX_CUDA_FLASH_WARPS", "4"));
  const size_t limit = smem_optin_limit();
  const auto fits = [&](int warps) { return size_t(flash_smem(dv, qkw, warps)) <= limit; };
  f.warps = wide && fits(8) ? 8 : fits(4) ? 4 : 0;
  return f;
}

bool attention_prefill(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe,
                       const uint16_t* k_pe, int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0,
                       const int* dpos, float scale, uint16_t* out, cudaStream_t s) {
  if (T < 2 || dk % 16 != 0 || dr % 16 != 0 || dk + dr > kFMaxQK || dk < 16 || dr < 16) return false;
  if (dv != 64 && dv != 128 && dv != 256) return false;
  for (const void* p : {static_cast<const void*>(q), static_cast<const void*>(k), static_cast<const void*>(v),
                        static_cast<const void*>(q_pe), static_cast<const void*>(k_pe), static_cast<const void*>(out)})
    if (!aligned16(p)) return false;
  const FlashForm f = flash_form(dv, dk, dr);
  if (f.warps == 0) return false;  // the card's shared memory holds no block of these rows
  const KvRows kv{k, v, int64_t(kv_heads) * dk, dk, int64_t(kv_heads) * dv, dv};
  launch_flash_mla(dv, FlashArgs{q, kv, q_pe, k_pe, T, heads, kv_heads, dk, dr, pos0, dpos, scale, out}, f, s);
  return true;
}

bool attention_prefill_cache(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int64_t capacity, int T,
                             int heads, int kv_heads, int hd, int pos0, const int* dpos, float scale, uint16_t* out,
                             cudaStream_t s) {
  if (T < 2 || (hd != 64 && hd != 128 && hd != 256)) return false;
  for (const void* p : {static_cast<const void*>(q), static_cast<const void*>(kc), static_cast<const void*>(vc),
                        static_cast<const void*>(out)})
    if (!aligned16(p)) return false;
  const FlashForm f = flash_form(hd, hd, 0);
  if (f.warps == 0) return false;
  const KvRows kv{kc, vc, hd, capacity * hd, hd, capacity * hd};
  launch_flash_gqa(hd, FlashArgs{q, kv, nullptr, nullptr, T, heads, kv_heads, hd, 0, pos0, dpos, scale, out}, f, s);
  return true;
}

bool decode_on_tensor_cores(int heads, int kv_heads, int dk, int dr) {
  return kv_heads == 1 && dk == kPmD && dr == kPmDR && heads >= 1 && heads <= 32 &&
         pe_mma_smem(1) <= smem_optin_limit() && !zmlx::cuda::env_is("ZMLX_CUDA_MLA_MMA", "0");
}

bool attention_decode(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe,
                      const uint16_t* k_pe, int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0,
                      const int* dpos, float scale, int splits, float* scratch, uint16_t* out, cudaStream_t s) {
  if (dk != dv || (dk != 256 && dk != 512) || (dr != 32 && dr != 64)) return false;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(k_pe)) return false;
  const bool same = k == v;
  if (T == 1 && same && decode_on_tensor_cores(heads, kv_heads, dk, dr) && aligned16(q_pe)) {
    // Heads a block, in tiles of 8: 8 while the grid fits two blocks an SM
    // (90 KB of shared memory each), else every head in one block. GLM's 20
    // heads (H100, 2026-11-28, decode tok/s): at 16 splits (512 tokens) 8 a
    // block 4 % faster than 24; at 64 (2,048) 390 against 382; at 128
    // (4,096 and 8,192) 24 a block 5 % / 9 % faster than 8; 16 a block (a
    // tile of 16 heads and one of 4) was slower than both at 64 splits.
    // ZMLX_CUDA_MLA_BLOCK_HEADS=8..32 fixes it (A/B runs and the test; read
    // per call).
    const int most = (heads + 7) / 8;
    int tiles = int64_t(splits) * most <= 2 * sm_count() ? 1 : most;
    if (const long fixed = zmlx::cuda::env_count("ZMLX_CUDA_MLA_BLOCK_HEADS", 0, 8, 32); fixed > 0) {
      if (fixed % 8 != 0) throw std::runtime_error("ZMLX_CUDA_MLA_BLOCK_HEADS: 8, 16, 24 or 32, not " +
                                                   std::to_string(fixed));
      tiles = int(fixed / 8);
    }
    tiles = std::min(tiles, most);
    // A card with less shared memory a block (sm_86 / sm_89: 99 KiB) takes
    // 8 heads a block (90 KB); decode_on_tensor_cores already asked that
    // those fit.
    if (pe_mma_smem(tiles) > smem_optin_limit()) tiles = 1;
    const unsigned blocks_y = unsigned((heads + tiles * 8 - 1) / (tiles * 8));
    // Two step buffers where they cost no block an SM: only one fits either
    // way (GLM's 20 heads in one block, 124 KB, from 89 splits: caches past
    // ~5,700 positions, whose splits take one to several steps). A one-step
    // split only commits an empty copy group more.
    // ZMLX_CUDA_MLA_DOUBLE_BUFFER=0: never (A/B runs and the test; read per call).
    const size_t sm_smem = size_t(device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(1 << 30));
    const bool db = pe_mma_smem(tiles, true) <= smem_optin_limit() && 2 * pe_mma_smem(tiles) > sm_smem &&
                    !zmlx::cuda::env_is("ZMLX_CUDA_MLA_DOUBLE_BUFFER", "0");
    auto go = [&](auto kern, size_t smem) {
      allow_dynamic_smem(reinterpret_cast<const void*>(kern), smem);
      launch_smem(kern, dim3(unsigned(splits), blocks_y), dim3(kPmWarps * 32), smem, s, q, k, q_pe, k_pe, heads, pos0,
                  dpos, scale, splits, scratch);
    };
    auto by_tiles = [&](auto db_c) {
      constexpr bool DB = decltype(db_c)::value;
      switch (tiles) {
        case 1: go(pe_decode_mma_kernel<1, DB>, pe_mma_smem(1, DB)); break;
        case 2: go(pe_decode_mma_kernel<2, DB>, pe_mma_smem(2, DB)); break;
        case 3: go(pe_decode_mma_kernel<3, DB>, pe_mma_smem(3, DB)); break;
        default: go(pe_decode_mma_kernel<4, DB>, pe_mma_smem(4, DB)); break;
      }
    };
    if (db) by_tiles(std::true_type{});
    else by_tiles(std::false_type{});
    cuda::k::merge_attention_splits(scratch, T, heads, dv, splits, out, s);
    return true;
  }
  const dim3 grid{unsigned(heads), unsigned(splits), unsigned(T)};
  auto go = [&](auto kern) {
    launch(kern, grid, dim3(kDW * 32), s, q, k, v, q_pe, k_pe, heads, kv_heads, pos0, dpos, scale, splits, scratch,
           cuda::k::kv_prefetch());
  };
  if (dk == 512) {
    if (dr == 64) same ? go(pe_decode_kernel<16, 2, true>) : go(pe_decode_kernel<16, 2, false>);
    else same ? go(pe_decode_kernel<16, 1, true>) : go(pe_decode_kernel<16, 1, false>);
  } else {
    if (dr == 64) same ? go(pe_decode_kernel<8, 2, true>) : go(pe_decode_kernel<8, 2, false>);
    else same ? go(pe_decode_kernel<8, 1, true>) : go(pe_decode_kernel<8, 1, false>);
  }
  cuda::k::merge_attention_splits(scratch, T, heads, dv, splits, out, s);  // the partials are in its layout
  return true;
}

bool multi_linear_n(const uint16_t* x, int T, int64_t ldx, int64_t xoff, int H, const QMat& m, uint16_t* out,
                    cudaStream_t s) {
  if (T < 16 || m.cols % 32 != 0 || m.rows % 8 != 0 || ldx % 8 != 0 || xoff % 8 != 0) return false;
  if (!aligned16(x) || !aligned16(m.w) || !aligned16(out)) return false;
  if (m.bits != 16 && (m.group < 32 || m.group % 32 != 0 || m.cols % m.group != 0 || !m.scales || !m.biases))
    return false;
  const dim3 grid(unsigned((T + kMT - 1) / kMT), unsigned((m.cols + kMC - 1) / kMC), unsigned(H));
  if (grid.z > 65535) return false;
  switch (m.bits) {
    case 2: multi_linear_n_mma_kernel<2><<<grid, 128, 0, s>>>(x, ldx, xoff, T, m, out); break;
    case 4: multi_linear_n_mma_kernel<4><<<grid, 128, 0, s>>>(x, ldx, xoff, T, m, out); break;
    case 8: multi_linear_n_mma_kernel<8><<<grid, 128, 0, s>>>(x, ldx, xoff, T, m, out); break;
    case 16: multi_linear_n_mma_kernel<16><<<grid, 128, 0, s>>>(x, ldx, xoff, T, m, out); break;
    default: return false;
  }
  return true;
}

void kernel_trace_arm(void* device_buf) { dev::arm_kernel_trace(device_buf); }

}  // namespace zmlx::cuda::mla
