// Tensor-core GEMMs for prefill (see gemm.h for the contracts).
//
// Block tile: BM = 64 rows of activations (tokens, or expert-sorted pairs)
// x BN = 128 weight rows x BK = 64 along K; 256 threads = 8 warps as 2 (M)
// x 4 (N), each warp 32 x 32 with mma.sync m16n8k16 (bf16 in, fp32 acc).
//
// Pipeline (STAGES deep, cp.async; 4 stages and 2 blocks an SM, or, for the
// 4-bit MoE linears where the SM's shared memory holds them, 3 stages and 3
// blocks): per K-step a stage holds the activation
// tile (bf16, 64 x 64) and the raw weight tile (packed words, or bf16 for
// dense weights). The packed tile is dequantized once into a bf16 tile
// (bf16(fma(scale, q, bias))), double-buffered: K-step kt + 1 is dequantized
// while K-step kt's MMAs run, one barrier a K-step; dense weights are used
// from the stage directly. Shared tiles of 64 bf16 per row (128 bytes = 8
// chunks of 16 bytes) store chunk c of row r at c ^ (r & 7), so ldmatrix,
// cp.async and the dequant stores are free of bank conflicts.
//
// The gate/up + SwiGLU variant loads 64 rows of G and the same 64 rows of U
// into one 128-row tile; warp (wm, wn) multiplies gate rows wn·16..+16 and
// up rows 64 + wn·16..+16, so each thread holds gate and up of the same
// outputs and applies SwiGLU in registers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/device_common.cuh"
#include "zmlx/backend/cuda/env_switch.h"
#include "zmlx/backend/cuda/gemm.h"

namespace zmlx::cuda::gemm {
namespace {

using namespace zmlx::cuda::dev;

constexpr int BM = 64, BN = 128, BK = 64, NT = 256;
constexpr int kBucketThreads = 1024;
constexpr int kDefaultExpertsHint = 128;

// ------------------------------------------------------------------ helpers

// Byte offset of 16-byte chunk c of row r in a [rows][64 bf16] swizzled tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return uint32_t(r * 128 + ((c ^ (r & 7)) << 4)); }

// Nibble j (bits 4j..4j+3, j <= 4) of a packed word as an exact float: the
// nibble stays where it is and becomes the low mantissa bits of a float
// whose exponent makes one unit of bit 4j worth 1.0, i.e. the float
// 2^(23-4j) + q; subtracting 2^(23-4j) leaves q. One LOP3 and one FADD a
// value, no shift: the same q as (w >> 4j) & 15 turned into a float.
template <int J>
__device__ __forceinline__ float nibble_as_float(uint32_t w) {
  static_assert(J >= 0 && J <= 4, "the nibble must lie inside the 23 mantissa bits");
  constexpr uint32_t kMagic = uint32_t(150 - 4 * J) << 23;  // the float 2^(23-4J)
  uint32_t bits;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(bits) : "r"(w), "n"(0xFu << (4 * J)), "r"(kMagic));  // (a & b) | c
  return __uint_as_float(bits) - __uint_as_float(kMagic);
}

// The 8 values of one 4-bit word, dequantized as bf16(fma(s, q, b)) and
// packed in pairs, value 0 lowest: nibbles 0..4 read in place, nibbles 5..7
// from the word shifted right by 12 (where they sit at positions 2..4).
__device__ __forceinline__ uint4 dequant_word4(uint32_t w, float s, float b) {
  const uint32_t hi = w >> 12;
  const float q0 = nibble_as_float<0>(w), q1 = nibble_as_float<1>(w), q2 = nibble_as_float<2>(w),
              q3 = nibble_as_float<3>(w), q4 = nibble_as_float<4>(w), q5 = nibble_as_float<2>(hi),
              q6 = nibble_as_float<3>(hi), q7 = nibble_as_float<4>(hi);
  return make_uint4(pack_bf2(__fmaf_rn(s, q0, b), __fmaf_rn(s, q1, b)), pack_bf2(__fmaf_rn(s, q2, b), __fmaf_rn(s, q3, b)),
                    pack_bf2(__fmaf_rn(s, q4, b), __fmaf_rn(s, q5, b)), pack_bf2(__fmaf_rn(s, q6, b), __fmaf_rn(s, q7, b)));
}

// ------------------------------------------------------------------ GEMM

struct Params {
  const uint16_t* a;      // activations, rows of K bf16
  int a_div;              // activation row of pair p: p / a_div
  const int32_t* perm;    // sorted row -> pair (MoE), null for dense
  const int4* tiles;      // MoE: {expert, first sorted row, end sorted row, 0}
  const int* ntiles;      // MoE: number of valid tiles
  int M;                  // dense: number of tokens
  QMat w0, w1;            // w1: up matrix (SwiGLU only)
  int64_t K, N;           // N = rows of w0 = output width
  uint16_t* out;          // [rows, N], row = token (dense) or pair (MoE)
  int splits;             // dense split-K: K ranges along blockIdx.z (1: none)
  bool dbuf;              // quantized weights: double-buffered dequantized tile (else one, two barriers a K-step)
  float* partial;         // splits > 1: [splits][M][N] fp32 sums ([..][2N] gate | up for SwiGLU)
};

template <int BITS, int STAGES>
struct Cfg {
  static constexpr int A_STAGE = BM * BK * 2;                       // bytes
  static constexpr int W_STAGE = BN * BK * BITS / 8;                // bytes
  static constexpr int CPR = BK * BITS / 8 / 16;                    // 16-byte chunks per weight row
  static constexpr int W_CHUNKS = BN * CPR;                         // per stage
  static constexpr int W_PER_THREAD = (W_CHUNKS + NT - 1) / NT;     // 1, 1, 2, 4
  static constexpr int B_TILE = BITS == 16 ? 0 : 2 * BN * BK * 2;   // dequantized tiles (double-buffered)
  static constexpr int SMEM = STAGES * (A_STAGE + W_STAGE) + B_TILE;
};

// STAGES = 3 trades pipeline depth for a third block an SM (80 registers; a
// third block fits only where an SM has ~207 KiB of shared memory, sm_90);
// the same products in the same order either way, so the same bits.
template <int BITS, bool SWIGLU, int STAGES>
__global__ void __launch_bounds__(NT, STAGES == 3 ? 3 : 2) gemm_kernel(Params p) {
  static_assert(STAGES == 3 || STAGES == 4, "the K-step loop's waits assume 3 or 4 stages");
  using C = Cfg<BITS, STAGES>;
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* sA = smem;
  uint8_t* sW = smem + STAGES * C::A_STAGE;
  uint8_t* sB = sW + STAGES * C::W_STAGE;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t K = p.K, N = p.N;
  // Split-K (dense only): this block's K-steps are kbeg .. kbeg + nk - 1.
  const int nk = int(K / BK) / p.splits, kbeg = int(blockIdx.z) * nk;
  const bool moe = p.tiles != nullptr;

  // Dense: blockIdx.x = M tile, y = N tile (blocks sharing a weight tile run
  // together). MoE: blockIdx.x = N tile, y strides over the tile table.
  const int nt = moe ? int(blockIdx.x) : int(blockIdx.y);
  const int64_t n0 = SWIGLU ? int64_t(nt) * 64 : int64_t(nt) * BN;  // first output column
  const int tile_count = moe ? *p.ntiles : 1;

  for (int ti = moe ? int(blockIdx.y) : 0; ti < tile_count; ti += moe ? int(gridDim.y) : 1) {
    int e = 0, row0, row_end;
    if (moe) {
      const int4 t = p.tiles[ti];
      e = t.x, row0 = t.y, row_end = t.z;
    } else {
      row0 = int(blockIdx.x) * BM;
      row_end = min(row0 + BM, p.M);
    }

    // ---- activation loads: 2 chunks per thread (64 rows x 8 chunks)
    const uint16_t* a_src[2];
    bool a_ok[2];
    uint32_t a_dst[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = (tid >> 3) + i * 32, c = tid & 7;
      const int row = row0 + r;
      a_ok[i] = row < row_end;
      int64_t arow = 0;
      if (a_ok[i]) arow = moe ? int64_t(p.perm[row] / p.a_div) : int64_t(row);
      a_src[i] = p.a + arow * K + c * 8;
      a_dst[i] = swz(r, c);
    }

    // ---- weight loads: W_PER_THREAD chunks per thread
    const uint32_t* w_src[C::W_PER_THREAD];
    bool w_ok[C::W_PER_THREAD];
    uint32_t w_dst[C::W_PER_THREAD];
#pragma unroll
    for (int i = 0; i < C::W_PER_THREAD; ++i) {
      const int c = tid + i * NT;
      const int r = c / C::CPR, cc = c % C::CPR;
      const bool up = SWIGLU && r >= 64;  // select fields, not the struct (keeps Params in param space)
      const uint32_t* mw = up ? p.w1.w : p.w0.w;
      const int64_t mstride = up ? p.w1.w_stride : p.w0.w_stride;
      const int64_t wrow = SWIGLU ? n0 + (r & 63) : n0 + r;
      w_ok[i] = c < C::W_CHUNKS && wrow < N;
      w_src[i] = mw + (w_ok[i] ? int64_t(e) * mstride + wrow * (K * BITS / 32) + cc * 4 : 0);
      w_dst[i] = BITS == 16 ? swz(r, cc) : uint32_t(r * C::CPR * 16 + cc * 16);
    }

    // ---- dequant role: row dr, values dh·32..+32 of each K-step
    const int dr = tid >> 1, dh = tid & 1;
    const uint16_t* s_src = nullptr;
    const uint16_t* b_src = nullptr;
    int group = 64;
    if constexpr (BITS != 16) {
      const bool up = SWIGLU && dr >= 64;
      const int64_t wrow = SWIGLU ? n0 + (dr & 63) : n0 + dr;
      group = p.w0.group;  // gate and up share the format
      if (wrow < N) {
        const int64_t off = int64_t(e) * (up ? p.w1.s_stride : p.w0.s_stride) + wrow * (K / group);
        s_src = (up ? p.w1.scales : p.w0.scales) + off;
        b_src = (up ? p.w1.biases : p.w0.biases) + off;
      }
    }

    auto load_stage = [&](int stage, int kt) {
      const uint32_t a_base = smem_addr(sA + stage * C::A_STAGE);
#pragma unroll
      for (int i = 0; i < 2; ++i) cp_async16(a_base + a_dst[i], a_src[i] + int64_t(kbeg + kt) * BK, a_ok[i]);
      const uint32_t w_base = smem_addr(sW + stage * C::W_STAGE);
#pragma unroll
      for (int i = 0; i < C::W_PER_THREAD; ++i) {
        if (C::W_CHUNKS % NT == 0 || tid + i * NT < C::W_CHUNKS)
          cp_async16(w_base + w_dst[i], w_src[i] + int64_t(kbeg + kt) * (BK * BITS / 32), w_ok[i]);
      }
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;

#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < nk) load_stage(st, st);
      cp_async_commit();
    }

    // group is 32, 64 or 128 (gemm_supported): the group index of a K
    // position is a shift, not a division, in the K-step loop.
    const int gshift = group == 32 ? 5 : group == 64 ? 6 : 7;
    uint16_t sc = 0, bi = 0;
    if (BITS != 16 && s_src) {
      const int gi = (kbeg * BK + dh * 32) >> gshift;
      sc = __ldg(s_src + gi);
      bi = __ldg(b_src + gi);
    }

    // Dequantize K-step kt's weight stage (raw words in sW) into the bf16
    // tile dst: this thread's 32 values of row dr, as 4 swizzled chunks; then
    // fetch the scale and bias of K-step kt + 1.
    auto dequant = [&](int kt, uint8_t* dst) {
      if constexpr (BITS != 16) {
        const uint32_t* src =
            reinterpret_cast<const uint32_t*>(sW + (kt % STAGES) * C::W_STAGE + dr * C::CPR * 16) + dh * BITS;
        uint32_t wv[BITS];
        if constexpr (BITS == 2) {
          const uint2 q = *reinterpret_cast<const uint2*>(src);
          wv[0] = q.x, wv[1] = q.y;
        } else {
#pragma unroll
          for (int i = 0; i < BITS / 4; ++i) {
            const uint4 q = reinterpret_cast<const uint4*>(src)[i];
            wv[4 * i] = q.x, wv[4 * i + 1] = q.y, wv[4 * i + 2] = q.z, wv[4 * i + 3] = q.w;
          }
        }
        const float s = bf(sc), b = bf(bi);
        if constexpr (BITS == 4) {
          // A word is one 16-byte chunk of the tile: 8 values.
#pragma unroll
          for (int j = 0; j < 4; ++j) *reinterpret_cast<uint4*>(dst + swz(dr, dh * 4 + j)) = dequant_word4(wv[j], s, b);
        } else {
          constexpr int per = 32 / BITS;
          constexpr uint32_t mask = (1u << BITS) - 1u;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t o[4];
#pragma unroll
            for (int v = 0; v < 4; ++v) {
              float f[2];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int i = j * 8 + v * 2 + h;
                const uint32_t q = (wv[i / per] >> (BITS * (i % per))) & mask;
                // exact int -> float: 2^23 + q, minus 2^23
                const float qf = __uint_as_float(0x4B000000u | q) - 8388608.0f;
                f[h] = __fmaf_rn(s, qf, b);
              }
              o[v] = pack_bf2(f[0], f[1]);
            }
            *reinterpret_cast<uint4*>(dst + swz(dr, dh * 4 + j)) = make_uint4(o[0], o[1], o[2], o[3]);
          }
        }
        // Scale and bias of the next K-step (latency hidden behind the MMAs).
        if (s_src && kt + 1 < nk) {
          const int gi = ((kbeg + kt + 1) * BK + dh * 32) >> gshift;
          sc = __ldg(s_src + gi);
          bi = __ldg(b_src + gi);
        }
      }
    };

    // Quantized weights: the dequantized tile is double-buffered, so K-step
    // kt + 1 is dequantized while K-step kt's MMAs run, with one barrier a
    // K-step (two before: one after the raw stage landed, one after the
    // dequantization). Same values, same MMA order: the same bits.
    if (BITS != 16 && p.dbuf) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      dequant(0, sB);
    }

    for (int kt = 0; kt < nk; ++kt) {
      const int st = kt % STAGES;
      const uint8_t* btile;
      if (BITS != 16 && !p.dbuf) {  // one tile buffer: dequantize K-step kt, then its MMAs
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        dequant(kt, sB);
        __syncthreads();
        const int kn = kt + STAGES - 1;
        if (kn < nk) load_stage(kn % STAGES, kn);
        cp_async_commit();
        btile = sB;
      } else if (BITS != 16) {
        // Raw stage kt + 1 has landed; every thread has finished K-step kt - 1
        // (whose tile buffer is dequantized into next) and sees tile kt.
        cp_async_wait<STAGES - 3>();
        __syncthreads();
        {
          const int kn = kt + STAGES - 1;  // into the raw stage of K-step kt - 1, dequantized before
          if (kn < nk) load_stage(kn % STAGES, kn);
          cp_async_commit();
        }
        if (kt + 1 < nk) dequant(kt + 1, sB + ((kt + 1) & 1) * (C::B_TILE / 2));
        btile = sB + (kt & 1) * (C::B_TILE / 2);
      } else {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        btile = sW + st * C::W_STAGE;
        const int kn = kt + STAGES - 1;
        if (kn < nk) load_stage(kn % STAGES, kn);
        cp_async_commit();
      }

      const uint32_t a_base = smem_addr(sA + st * C::A_STAGE);
      const uint32_t b_base = smem_addr(btile);
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[2][4], bfr[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wm * 32 + i * 16 + (lane & 15);
          ldmatrix_x4(af[i], a_base + swz(r, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int nb = SWIGLU ? q * 64 + wn * 16 : wn * 32 + q * 16;
          const int r = nb + (lane & 7) + ((lane >> 4) << 3);
          uint32_t t[4];
          ldmatrix_x4(t, b_base + swz(r, kk * 2 + ((lane >> 3) & 1)));
          bfr[2 * q][0] = t[0], bfr[2 * q][1] = t[1], bfr[2 * q + 1][0] = t[2], bfr[2 * q + 1][1] = t[3];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_bf16(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
      }
    }

    // ---- epilogue
    const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = row0 + wm * 32 + i * 16 + g + hh * 8;
        if (row >= row_end) continue;
        const int64_t orow = moe ? int64_t(p.perm[row]) : int64_t(row);
        uint16_t* o = p.out + orow * N;
        constexpr int NJ = SWIGLU ? 2 : 4;
        if (p.splits > 1) {
          // fp32 partial sums of this K range; split_sum_kernel rounds.
          constexpr int W = SWIGLU ? 2 : 1;
          float* pr = p.partial + (int64_t(blockIdx.z) * p.M + orow) * (W * N);
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const int64_t col = SWIGLU ? n0 + wn * 16 + j * 8 + c2 : n0 + wn * 32 + j * 8 + c2;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              if (col + e >= N) continue;
              pr[col + e] = acc[i][j][hh * 2 + e];
              if constexpr (SWIGLU) pr[N + col + e] = acc[i][j + 2][hh * 2 + e];
            }
          }
          continue;
        }
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          const int64_t col = SWIGLU ? n0 + wn * 16 + j * 8 + c2 : n0 + wn * 32 + j * 8 + c2;
          float v0, v1;
          if constexpr (SWIGLU) {
            v0 = swiglu_f(rbf(acc[i][j][hh * 2]), rbf(acc[i][j + 2][hh * 2]));
            v1 = swiglu_f(rbf(acc[i][j][hh * 2 + 1]), rbf(acc[i][j + 2][hh * 2 + 1]));
          } else {
            v0 = acc[i][j][hh * 2];
            v1 = acc[i][j][hh * 2 + 1];
          }
          if ((N & 1) == 0 && col + 1 < N) {
            *reinterpret_cast<uint32_t*>(o + col) = pack_bf2(v0, v1);
          } else {
            if (col < N) o[col] = to_bf(v0);
            if (col + 1 < N) o[col + 1] = to_bf(v1);
          }
        }
      }
    }

    if (moe) {
      // The next tile's prologue overwrites the stages and sB.
      cp_async_wait<0>();
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------ bucketing

struct Workspace {
  int* counts;   // [kMaxExperts]
  int* offsets;  // [kMaxExperts]
  int* ntiles;   // [1]
  int4* tiles;   // [max_tiles]
  int32_t* perm; // [P]
  int max_tiles;
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }
// Tiles of at most tile_rows pairs of one expert: at most one partial tile an expert.
int max_tiles_for(int64_t P, int tile_rows = BM) {
  return int((P + tile_rows - 1) / tile_rows + std::min<int64_t>(P, kMaxExperts));
}

Workspace carve(void* ws, int64_t P, int tile_rows = BM) {
  Workspace w{};
  uint8_t* b = static_cast<uint8_t*>(ws);
  w.max_tiles = max_tiles_for(P, tile_rows);
  w.counts = reinterpret_cast<int*>(b);
  b += align256(sizeof(int) * kMaxExperts);
  w.offsets = reinterpret_cast<int*>(b);
  b += align256(sizeof(int) * kMaxExperts);
  w.ntiles = reinterpret_cast<int*>(b);
  b += 256;
  w.tiles = reinterpret_cast<int4*>(b);
  b += align256(sizeof(int4) * size_t(w.max_tiles));
  w.perm = reinterpret_cast<int32_t*>(b);
  return w;
}

size_t workspace_size(int64_t P, int tile_rows = BM) {
  return 2 * align256(sizeof(int) * kMaxExperts) + 256 + align256(sizeof(int4) * size_t(max_tiles_for(P, tile_rows))) +
         align256(sizeof(int32_t) * size_t(std::max<int64_t>(P, 1)));
}

__global__ void count_kernel(const int32_t* ex, int P, int* counts) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < P) {
    const int e = ex[i];
    if (unsigned(e) < unsigned(kMaxExperts)) atomicAdd(&counts[e], 1);
  }
}

// One block of kBucketThreads (= kMaxExperts) threads: exclusive scans of the
// counts and of the tile counts, then the tile table.
// Experts from num_experts up count as empty (their pairs are left out of
// the tiles, as count_kernel leaves out ids past kMaxExperts).
__global__ void __launch_bounds__(kBucketThreads) scan_kernel(const int* counts, int* offsets, int4* tiles,
                                                              int* ntiles, int max_tiles, int tile_rows,
                                                              int num_experts) {
  __shared__ int wc[32], wt[32];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  const int c = e < num_experts ? counts[e] : 0;
  const int t = (c + tile_rows - 1) / tile_rows;
  int ic = c, it = t;  // inclusive warp scans
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int xc = __shfl_up_sync(0xffffffffu, ic, o), xt = __shfl_up_sync(0xffffffffu, it, o);
    if (lane >= o) ic += xc, it += xt;
  }
  if (lane == 31) wc[warp] = ic, wt[warp] = it;
  __syncthreads();
  if (warp == 0) {
    int vc = wc[lane], vt = wt[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int xc = __shfl_up_sync(0xffffffffu, vc, o), xt = __shfl_up_sync(0xffffffffu, vt, o);
      if (lane >= o) vc += xc, vt += xt;
    }
    wc[lane] = vc, wt[lane] = vt;  // inclusive over warps
  }
  __syncthreads();
  const int off = (warp ? wc[warp - 1] : 0) + ic - c;
  const int toff = (warp ? wt[warp - 1] : 0) + it - t;
  offsets[e] = off;
  for (int j = 0; j < t; ++j)
    if (toff + j < max_tiles)
      tiles[toff + j] = make_int4(e, off + j * tile_rows, min(off + (j + 1) * tile_rows, off + c), 0);
  if (e == kBucketThreads - 1) *ntiles = min(wt[31], max_tiles);
}

// Block e writes the pairs of expert e in increasing pair order.
__global__ void __launch_bounds__(256) scatter_kernel(const int32_t* ex, int P, const int* counts, const int* offsets,
                                                      int32_t* perm) {
  const int e = blockIdx.x;
  if (counts[e] == 0) return;
  __shared__ int wtot[8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int run = offsets[e];
  for (int p0 = 0; p0 < P; p0 += 256) {
    const int pi = p0 + tid;
    const bool hit = pi < P && ex[pi] == e;
    const unsigned bal = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) wtot[warp] = __popc(bal);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      before += w < warp ? wtot[w] : 0;
      total += wtot[w];
    }
    if (hit) perm[run + before + __popc(bal & ((1u << lane) - 1u))] = pi;
    run += total;
    __syncthreads();
  }
}

// num_experts (1..kMaxExperts; 0: kMaxExperts): the matrices' expert count.
// It bounds the tiles (at most one partial tile an expert), so the grid a
// kernel launches over them (w.max_tiles rows) holds few empty blocks, and
// the scatter's blocks (one an expert).
Workspace bucket(const int32_t* experts, int64_t P, void* ws, cudaStream_t s, int tile_rows = BM, int num_experts = 0) {
  const int E = num_experts > 0 && num_experts < kMaxExperts ? num_experts : kMaxExperts;
  Workspace w = carve(ws, P, tile_rows);
  w.max_tiles = int(std::min<int64_t>(w.max_tiles, (P + tile_rows - 1) / tile_rows + std::min<int64_t>(P, E)));
  cudaMemsetAsync(w.counts, 0, sizeof(int) * kMaxExperts, s);
  count_kernel<<<unsigned((P + 255) / 256), 256, 0, s>>>(experts, int(P), w.counts);
  scan_kernel<<<1, kBucketThreads, 0, s>>>(w.counts, w.offsets, w.tiles, w.ntiles, w.max_tiles, tile_rows, E);
  scatter_kernel<<<unsigned(E), 256, 0, s>>>(experts, int(P), w.counts, w.offsets, w.perm);
  return w;
}

// ------------------------------------------------------------------ combine

__global__ void combine_kernel(const uint16_t* y, const void* scores, bool f32, int mode, int T, int k, int64_t D,
                               uint16_t* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(T) * D) return;
  const int64_t t = i / D, d = i % D;
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const int64_t pi = t * k + j;
    const float v = bf(y[pi * D + d]);
    float term;
    if (mode == ::zmlx::cuda::k::kBf16Products) {
      term = rbf(v * bf(static_cast<const uint16_t*>(scores)[pi]));
    } else {
      const float sc = f32 ? static_cast<const float*>(scores)[pi] : bf(static_cast<const uint16_t*>(scores)[pi]);
      term = v * sc;
    }
    acc += term;
  }
  out[i] = to_bf(acc);
}

// ------------------------------------------------------------------ split-K

// out[t, n] = bf16(Σ_z partial[z][t][n]), summed in split order; SwiGLU:
// swiglu(bf16(Σ gate), bf16(Σ up)) as the unsplit epilogue rounds.
__global__ void split_sum_kernel(const float* part, int S, int64_t M, int64_t N, bool swiglu, uint16_t* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t t = i / N, n = i % N, W = swiglu ? 2 * N : N;
  float g = part[t * W + n];
  for (int z = 1; z < S; ++z) g += part[(z * M + t) * W + n];
  if (!swiglu) {
    out[i] = to_bf(g);
    return;
  }
  float u = part[t * W + N + n];
  for (int z = 1; z < S; ++z) u += part[(z * M + t) * W + N + n];
  out[i] = to_bf(swiglu_f(rbf(g), rbf(u)));
}

// Split count of a dense GEMM: a grid of few (M x N) tiles leaves most SMs
// idle while each block walks all of K, so K is cut into S ranges (S a
// power of two, each range at least kSplitMinSteps K-steps) until the grid
// has about kSplitTargetBlocks blocks. A function of (T, N, K) only: the
// fused SwiGLU GEMM and the separate gate and up GEMMs of one MLP split
// alike and give the same bits. (Measured on an H100, 512 tokens: k_proj
// 2048 -> 512 took 37.5 us and o_proj 4096 -> 2048 70.8 us unsplit, with
// 32 and 128 blocks.)
constexpr int64_t kSplitTargetBlocks = 256;  // about two blocks per SM (132 SMs on an H100)
constexpr int kSplitMinSteps = 8;
constexpr int kMaxSplits = 8;
// Prompts of one M tile (T <= BM: short prompts) split further: their
// blocks' K-steps are the cheapest, so the serial K loop's latency is most
// of a call. Prefill with these against the above (H200, 2026-11-29 10:23,
// docs/performance.md "Short prompts, part two"): 16 tokens +3-4 % on all
// three families, 64 tokens -0.1 to +2 %; at 128 tokens (two M tiles) they
// cost 1-4 %, so two tiles and up keep the rule above.
constexpr int64_t kSplitTargetBlocksOneTile = 512;
constexpr int kSplitMinStepsOneTile = 4;
constexpr int kMaxSplitsOneTile = 16;
// ZMLX_GEMM_MOE_3STAGE=0: the 4-bit MoE linears (the down projection, and
// the unfused path's gate and up) in the 4-stage, 2-blocks-an-SM form like
// every other GEMM (A/B runs; the same bits either way). By default they run
// 3 stages deep at 3 blocks an SM where three fit: down 168.7 -> 157.4 us at
// 512 tokens and 677.4 -> 629.5 at 4,096 on Qwen3's shapes (H200, gemm_bench,
// 2026-11-29 06:00), where the dense projections lost 6-9 % in that form and
// gate+up gained under 2 %. Read per call (both forms give the same bits),
// so a test can compare them in one process.
bool moe_three_stage_enabled() { return env_on("ZMLX_GEMM_MOE_3STAGE"); }

// Whether three blocks of the 3-stage form fit an SM of the current device:
// sm_90's 228 KiB of shared memory do; sm_80 (164 KiB) holds two and
// sm_86/89 (100 KiB) one, where the shallower pipeline would be all cost.
bool three_stage_fits_device() {
  const int per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(0);
  const int reserved = device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(1024);
  return per_sm >= 3 * (Cfg<4, 3>::SMEM + reserved);
}

// ZMLX_GEMM_DBUF=0: one dequantized tile buffer and two barriers a K-step,
// as before the double buffering (A/B runs; the same bits either way).
bool dbuf_enabled() {
  static const bool on = env_on("ZMLX_GEMM_DBUF");
  return on;
}

// ZMLX_GEMM_SPLIT=0 turns splitting off (A/B runs); read once per process,
// so every GEMM of a run decides alike.
bool split_enabled() {
  static const bool on = env_on("ZMLX_GEMM_SPLIT");
  return on;
}
// ZMLX_GEMM_SPLIT_BLOCKS / _MIN_STEPS / _MAX (tuning runs): the split's
// target blocks, least K-steps a split and most splits from the
// environment, for every T (read once per process; 0 or unset: the rules
// above).
int dense_splits(int64_t T, int64_t N, int64_t K) {
  if (!split_enabled()) return 1;
  const bool one_tile = T <= BM;
  static const int env_target = int(env_count("ZMLX_GEMM_SPLIT_BLOCKS", 0, 0, 1 << 16));
  static const int env_min_steps = int(env_count("ZMLX_GEMM_SPLIT_MIN_STEPS", 0, 0, 1 << 16));
  static const int env_max = int(env_count("ZMLX_GEMM_SPLIT_MAX", 0, 0, 64));
  const int64_t target = env_target ? env_target : one_tile ? kSplitTargetBlocksOneTile : kSplitTargetBlocks;
  const int min_steps = env_min_steps ? env_min_steps : one_tile ? kSplitMinStepsOneTile : kSplitMinSteps;
  const int max_splits = env_max ? env_max : one_tile ? kMaxSplitsOneTile : kMaxSplits;
  const int64_t tiles = ((T + BM - 1) / BM) * ((N + BN - 1) / BN), nk = K / BK;
  int s = 1;
  while (s < max_splits && tiles * s * 2 <= target && nk % (2 * s) == 0 && nk / (2 * s) >= min_steps) s *= 2;
  return s;
}

// ------------------------------------------------------------------ launch

void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("zmlx gemm ") + what + ": " + cudaGetErrorString(e));
}

template <int BITS, bool SWIGLU, int STAGES = 4>
void launch_gemm(const Params& p, dim3 grid, cudaStream_t s) {
  constexpr int smem = Cfg<BITS, STAGES>::SMEM;
  // Opt in to > 48 KiB of dynamic shared memory once per device.
  static std::atomic<uint64_t> done{0};
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(done.load(std::memory_order_acquire) & bit)) {
    const cudaError_t e =
        cudaFuncSetAttribute(gemm_kernel<BITS, SWIGLU, STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) throw std::runtime_error(std::string("zmlx gemm: shared memory opt-in: ") + cudaGetErrorString(e));
    done.fetch_or(bit, std::memory_order_acq_rel);
  }
  gemm_kernel<BITS, SWIGLU, STAGES><<<grid, NT, smem, s>>>(p);
}

template <bool SWIGLU>
void launch_bits(int bits, const Params& p, dim3 grid, cudaStream_t s) {
  switch (bits) {
    case 2: launch_gemm<2, SWIGLU>(p, grid, s); break;
    case 4: launch_gemm<4, SWIGLU>(p, grid, s); break;
    case 8: launch_gemm<8, SWIGLU>(p, grid, s); break;
    case 16: launch_gemm<16, SWIGLU>(p, grid, s); break;
    default: throw std::runtime_error("zmlx gemm: unsupported bits " + std::to_string(bits));
  }
}

void require(const QMat& w, const char* what) {
  if (!gemm_supported(w)) throw std::runtime_error(std::string("zmlx gemm ") + what + ": unsupported weight format");
}

unsigned moe_grid_y(int64_t P, int num_experts) {
  const int64_t hint = num_experts > 0 ? num_experts : kDefaultExpertsHint;
  const int64_t y = (P + BM - 1) / BM + std::min<int64_t>(P, hint);
  return unsigned(std::min<int64_t>(std::max<int64_t>(y, 1), 65535));
}

}  // namespace

bool gemm_supported(const QMat& w) {
  if (!w.w || w.rows < 1 || w.cols < BK || w.cols % BK != 0) return false;
  if (w.bits == 16) return true;
  if (w.bits != 2 && w.bits != 4 && w.bits != 8) return false;
  if (w.group != 32 && w.group != 64 && w.group != 128) return false;
  if (w.cols % w.group != 0 || !w.scales || !w.biases) return false;
  return (reinterpret_cast<uintptr_t>(w.w) & 15) == 0;
}

size_t gemm_dense_workspace_bytes(int T, const QMat& w, bool swiglu) {
  const int S = dense_splits(T, w.rows, w.cols);
  return S == 1 ? 0 : size_t(S) * size_t(T) * size_t(w.rows) * (swiglu ? 2 : 1) * sizeof(float);
}

namespace {
// Launches the dense GEMM (split when dense_splits says so) and the split sum.
void dense(const char* what, bool swiglu, const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y,
           float* workspace, cudaStream_t s) {
  Params p{};
  p.a = x, p.a_div = 1, p.M = T, p.w0 = g, p.w1 = u, p.K = g.cols, p.N = g.rows, p.out = y;
  p.splits = dense_splits(T, g.rows, g.cols);
  p.partial = workspace;
  p.dbuf = dbuf_enabled();
  if (p.splits > 1 && !workspace)
    throw std::runtime_error(std::string("zmlx ") + what + ": this shape splits K and needs a workspace of " +
                             std::to_string(gemm_dense_workspace_bytes(T, g, swiglu)) + " bytes");
  const dim3 grid(unsigned((T + BM - 1) / BM), unsigned((g.rows + (swiglu ? 63 : BN - 1)) / (swiglu ? 64 : BN)),
                  unsigned(p.splits));
  if (grid.y > 65535) throw std::runtime_error(std::string("zmlx ") + what + ": too many rows");
  if (swiglu) launch_bits<true>(g.bits, p, grid, s);
  else launch_bits<false>(g.bits, p, grid, s);
  check(what);
  if (p.splits > 1) {
    const int64_t n = int64_t(T) * g.rows;
    split_sum_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(workspace, p.splits, T, g.rows, swiglu, y);
    check(what);
  }
}
}  // namespace

void gemm_dense(const uint16_t* x, int T, const QMat& w, uint16_t* y, cudaStream_t s, float* workspace) {
  if (T <= 0) return;
  require(w, "gemm_dense");
  dense("gemm_dense", false, x, T, w, w, y, workspace, s);
}

void gemm_dense_swiglu(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s,
                       float* workspace) {
  if (T <= 0) return;
  require(g, "gemm_dense_swiglu");
  require(u, "gemm_dense_swiglu");
  if (g.bits != u.bits || g.group != u.group || g.rows != u.rows || g.cols != u.cols)
    throw std::runtime_error("zmlx gemm_dense_swiglu: gate and up differ in format");
  dense("gemm_dense_swiglu", true, x, T, g, u, y, workspace, s);
}

size_t moe_workspace_bytes(int T, int k, int E) {
  if (E > kMaxExperts) throw std::runtime_error("zmlx gemm: more than kMaxExperts experts");
  return workspace_size(int64_t(T) * k);
}

void moe_gate_up_swiglu(const uint16_t* x, const int32_t* experts, int T, int k, const QMat& g, const QMat& u,
                        uint16_t* out, void* workspace, cudaStream_t s, int num_experts) {
  const int64_t P = int64_t(T) * k;
  if (P <= 0) return;
  require(g, "moe_gate_up_swiglu");
  require(u, "moe_gate_up_swiglu");
  if (g.bits != u.bits || g.group != u.group || g.rows != u.rows || g.cols != u.cols)
    throw std::runtime_error("zmlx moe_gate_up_swiglu: gate and up differ in format");
  const Workspace w = bucket(experts, P, workspace, s, BM, num_experts);
  check("moe bucketing");
  Params p{};
  p.a = x, p.a_div = k, p.perm = w.perm, p.tiles = w.tiles, p.ntiles = w.ntiles;
  p.w0 = g, p.w1 = u, p.K = g.cols, p.N = g.rows, p.out = out, p.splits = 1, p.dbuf = dbuf_enabled();
  const dim3 grid(unsigned((g.rows + 63) / 64), moe_grid_y(P, num_experts));
  launch_bits<true>(g.bits, p, grid, s);
  check("moe_gate_up_swiglu");
}

size_t pair_groups_workspace_bytes(int64_t P) {
  return workspace_size(std::max<int64_t>(P, 1), ::zmlx::cuda::k::kGroupPairs);
}

::zmlx::cuda::k::PairGroups bucket_pairs(const int32_t* experts, int64_t P, void* workspace, cudaStream_t s,
                                         int num_experts) {
  if (P <= 0) throw std::runtime_error("zmlx bucket_pairs: no pairs");
  const Workspace w = bucket(experts, P, workspace, s, ::zmlx::cuda::k::kGroupPairs, num_experts);
  check("pair bucketing");
  return {reinterpret_cast<const int32_t*>(w.tiles), w.ntiles, w.perm, w.max_tiles};
}

bool moe_linear_three_stage(const QMat& w) {
  return w.bits == 4 && moe_three_stage_enabled() && three_stage_fits_device();
}

void moe_linear(const uint16_t* x, bool per_slot, const int32_t* experts, int T, int k, const QMat& d, uint16_t* y,
                void* workspace, cudaStream_t s, int num_experts) {
  const int64_t P = int64_t(T) * k;
  if (P <= 0) return;
  require(d, "moe_linear");
  const Workspace w = bucket(experts, P, workspace, s, BM, num_experts);
  check("moe bucketing");
  Params p{};
  p.a = x, p.a_div = per_slot ? 1 : k, p.perm = w.perm, p.tiles = w.tiles, p.ntiles = w.ntiles;
  p.w0 = d, p.w1 = d, p.K = d.cols, p.N = d.rows, p.out = y, p.splits = 1, p.dbuf = dbuf_enabled();
  const dim3 grid(unsigned((d.rows + BN - 1) / BN), moe_grid_y(P, num_experts));
  if (moe_linear_three_stage(d)) launch_gemm<4, false, 3>(p, grid, s);
  else launch_bits<false>(d.bits, p, grid, s);
  check("moe_linear");
}

void moe_down(const uint16_t* h, const int32_t* experts, int T, int k, const QMat& d, uint16_t* y, void* workspace,
              cudaStream_t s, int num_experts) {
  moe_linear(h, true, experts, T, k, d, y, workspace, s, num_experts);
}

void moe_combine(const uint16_t* y, const void* scores, bool scores_f32, Combine mode, int T, int k, int64_t D,
                 uint16_t* out, cudaStream_t s) {
  const int64_t n = int64_t(T) * D;
  if (n <= 0) return;
  combine_kernel<<<unsigned((n + 255) / 256), 256, 0, s>>>(y, scores, scores_f32, int(mode), T, k, D, out);
  check("moe_combine");
}

}  // namespace zmlx::cuda::gemm
