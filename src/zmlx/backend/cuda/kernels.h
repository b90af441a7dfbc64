// CUDA kernels of the CUDA backend, behind plain host functions (raw device
// pointers, one stream) so the backend class itself compiles as ordinary C++.
//
// Numerics follow ops/backend.h: bf16 activations (stored as uint16_t bit
// patterns), fp32 accumulation, bf16 rounding exactly where the CPU backend
// rounds. Kernels are compiled with --fmad=false and use explicit fmaf() where
// they want a fused multiply-add, so the same device function gives the same
// bits in every kernel that inlines it — the basis of "fused == unfused".
//
// Position-dependent kernels (rope, kv_write, attention) take both a host
// value and an optional device pointer: a recorded CUDA graph passes the
// pointer so one recording serves every position.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace zmlx::cuda::k {

// One matrix or E stacked expert matrices, [E?, rows, cols], MLX affine
// quantized (bits 2/4/8, packed little-end-first into uint32) or dense bf16.
struct QMat {
  const uint32_t* w = nullptr;       // packed words, or the bf16 data (as words) when dense
  const uint16_t* scales = nullptr;  // bf16 [E?, rows, cols / group]
  const uint16_t* biases = nullptr;
  int64_t rows = 0, cols = 0;
  int bits = 16;                     // 16: dense bf16
  int group = 64;
  // Per-expert strides, in uint32 words (w) and in groups (scales/biases).
  int64_t w_stride = 0, s_stride = 0;
};

// A MoE block's shared expert's down projection m applied to h (its
// swiglu'd gate+up, one row), for gather_combine_shared; m.w null: none.
struct SharedDown {
  QMat m;
  const uint16_t* h = nullptr;
};

// How the MoE combine rounds (mirrors zmlx::CombineMode).
enum Combine : int { kBf16Products = 0, kF32Products = 1 };

void embed(const QMat& table, const int32_t* ids, int T, uint16_t* out, cudaStream_t s);

// y[T, N] = bf16(x[T, K] · Wᵀ)
void linear(const uint16_t* x, int T, const QMat& w, uint16_t* y, cudaStream_t s);
// Whether linear() of one token streams w through shared memory (the output
// head: a tensor-core matrix of at least kHeadStreamMinRows rows, on a Hopper
// GPU; the tensor-core kernel's bits; ZMLX_CUDA_HEAD_STREAM=0: never).
constexpr int64_t kHeadStreamMinRows = 16384;
bool head_stream_fits(const QMat& w);
// Whether the scalar decode mat-vecs stage their input once a block in shared
// memory (kernels.cu, stage_x_block; ZMLX_CUDA_STAGE_X=0: never); the
// long-row form (rows of 4,097-8,192 inputs) stages only with =all
// (with_staged_x). The bits are the same either way.
bool stage_x();
// Whether the per-head decode attention kernels (GQA's attn_partial_kernel,
// MLA's) send their splits' cached rows to L2 before their programmatic-launch
// wait (ZMLX_CUDA_KV_PREFETCH=0: no, for A/B runs; the same bits; read per
// launch). The grouped GQA kernel copies them to shared memory instead.
bool kv_prefetch();
// ys[i][T, N_i] = bf16(x · W_iᵀ) for up to 4 matrices of one format, one launch.
void linear_multi(const uint16_t* x, int T, const QMat* ms, uint16_t* const* ys, int n, cudaStream_t s);
// Whether linear(x, m) of one token unpacks m's 4-bit weights into bf16
// pairs before the programmatic-launch wait (the scalar decode kernel's CV
// form; ZMLX_CUDA_PRECONVERT), as the launch decides: the same bits either way.
bool linear_unpacks_ahead(const QMat& m);
// y[T, N] = swiglu(bf16(x·Gᵀ), bf16(x·Uᵀ))
void linear_swiglu(const uint16_t* x, int T, const QMat& g, const QMat& u, uint16_t* y, cudaStream_t s);

// Expert matmuls for P = T·k (token, slot) pairs; experts[p] picks the
// matrix. Input row of pair p: x[p] when per_slot, else x[p / k].
void gather_linear(const uint16_t* x, bool per_slot, const int32_t* experts, int T, int k, const QMat& w,
                   uint16_t* y, cudaStream_t s);
// x_ready: x was complete before the kernel just enqueued ran (the MoE
// block's input, which the router read): the tensor-core form then stages it
// before its programmatic-launch wait.
void gather_swiglu(const uint16_t* x, const int32_t* experts, int T, int k, const QMat& g, const QMat& u,
                   uint16_t* y, cudaStream_t s, bool x_ready = false);
// The same for pairs bucketed by expert (prefill of short prompts: a few
// pairs an expert): tiles of at most kGroupPairs pairs of one expert, as
// gemm::bucket_pairs makes them; each tile's weights are read once for all
// its pairs (the MMA's 8 columns). The values of gather_linear /
// gather_swiglu up to fp32 summation order; the grouped gate, up and fused
// gate+up agree bit for bit. Only where grouped_fits(): the tensor-core
// format (4-bit) with groups of 32, 64 or 128, rows of 64 to kGroupMaxK inputs.
constexpr int kGroupPairs = 8;
constexpr int64_t kGroupMaxK = 4096;
struct PairGroups {
  const int32_t* tiles; // 4 ints a tile: expert, first sorted pair, end sorted pair, 0
  const int* ntiles;    // number of valid tiles (device)
  const int32_t* perm;  // sorted pair -> pair
  int max_tiles;        // grid rows to launch (tiles past *ntiles exit)
};
bool grouped_fits(const QMat& m);
// The pairs and their experts come from grp; k: slots a token (the input
// row of pair p is x[p] when per_slot, else x[p / k]).
void gather_linear_grouped(const uint16_t* x, bool per_slot, int k, const QMat& w, uint16_t* y, const PairGroups& grp,
                           cudaStream_t s);
void gather_swiglu_grouped(const uint16_t* x, int k, const QMat& g, const QMat& u, uint16_t* y, const PairGroups& grp,
                           cudaStream_t s);
// out[t, d] = Σ_j term(bf16(h[t, j] · down[e_tj][d]), score[t, j]) in slot order.
// routing_ready: experts and scores were complete before the kernel just
// enqueued ran (e.g. it, or an earlier kernel, read them): the tensor-core
// form then reads them, and its first weights, before its programmatic-launch
// wait, overlapping the previous kernel.
void gather_combine(const uint16_t* h, const int32_t* experts, const void* scores, bool scores_f32, Combine mode,
                    int T, int k, const QMat& down, uint16_t* out, cudaStream_t s, bool routing_ready = false);
// One token: gather_combine, then out += bf16(shared.h · shared.mᵀ) as add()
// adds it, in one launch; the bits of gather_combine, linear and add. Only
// where gather_combine_shared_fits() says so (otherwise the caller launches
// the three ops; ZMLX_CUDA_SHARED_EXPERT_FUSION=0: never).
bool gather_combine_shared_fits(const QMat& down, const QMat& shared_down);
void gather_combine_shared(const uint16_t* h, const int32_t* experts, const void* scores, bool scores_f32,
                           Combine mode, int k, const QMat& down, const SharedDown& shared, uint16_t* out,
                           cudaStream_t s, bool routing_ready);
// One token: linear(x, w) -> y and linear_swiglu(x, g, u) -> yh in one
// launch (a MoE block's router and its shared expert's gate+up), each with
// the bits of its own op. Only where linear_and_swiglu_fits() says so: both
// take the scalar decode kernels (ZMLX_CUDA_SHARED_EXPERT_FUSION=0: never).
bool linear_and_swiglu_fits(const QMat& w, const QMat& g, const QMat& u);
void linear_and_swiglu(const uint16_t* x, const QMat& w, uint16_t* y, const QMat& g, const QMat& u, uint16_t* yh,
                       cudaStream_t s);
// linear_and_swiglu plus route_sigmoid_grouped of the logits (one token):
// the router's blocks form a thread-block cluster whose first block picks
// the experts while the shared gate+up blocks still run; logits, picks,
// scores and yh have the three ops' bits. Only where
// linear_route_and_swiglu_fits() says so: linear_and_swiglu fits, at most 64
// experts, top-16, no group limiting (n_group 1 or topk_group >= n_group),
// a Hopper GPU running the sm_90 kernels; ZMLX_CUDA_ROUTE_IN_ROUTER=0: never.
struct GroupedRoute {
  const float* bias;  // F32 [E]
  int k, n_group, topk_group;
  bool normalize;
  float eps, scaling;
  int32_t* experts;  // [k]
  float* scores;     // [k]
};
bool linear_route_and_swiglu_fits(const QMat& w, const QMat& g, const QMat& u, int k, int n_group, int topk_group);
void linear_route_and_swiglu(const uint16_t* x, const QMat& w, uint16_t* y, const GroupedRoute& r, const QMat& g,
                             const QMat& u, uint16_t* yh, cudaStream_t s);
// linear(x, w) of one token plus route_softmax or route_sigmoid of the
// logits in the same launch: the router's blocks form a thread-block cluster
// whose first block picks the experts; logits, ids and bf16 scores have the
// two ops' bits. Only where linear_route_fits() says so: the router takes the
// scalar decode kernel (4-, 8-bit or bf16), at most 128 experts (16 blocks,
// where the GPU runs clusters that large), top-16, a Hopper GPU running the
// sm_90 kernels; ZMLX_CUDA_ROUTE_IN_ROUTER=0: never.
struct TopKRoute {
  bool sigmoid;       // route_sigmoid (bias, eps, scaling) or route_softmax
  const float* bias;  // F32 [E] (sigmoid)
  int k;
  bool normalize;
  float eps, scaling;
  bool packed;  // softmax: route_packed_topk(E, k), as route_softmax decides
  int32_t* experts;  // [k]
  uint16_t* scores;  // [k] bf16
};
bool linear_route_fits(const QMat& w, int k);
void linear_route(const uint16_t* x, const QMat& w, uint16_t* y, const TopKRoute& r, cudaStream_t s);
// route_softmax's choice of top-k form (ZMLX_CUDA_PACKED_TOPK, read each call).
bool route_packed_topk(int E, int k);
// out[t, d] = Σ_j term(y[t, j, d], score[t, j]) in slot order.
void moe_combine(const uint16_t* y, const void* scores, bool scores_f32, Combine mode, int T, int k, int64_t D,
                 uint16_t* out, cudaStream_t s);

void rms_norm(const uint16_t* x, int64_t rows, int64_t D, const uint16_t* w, float eps, uint16_t* out,
              cudaStream_t s);
// h = bf16(h + x) in place; out = rms_norm(h, w) (rows of D).
void add_rms_norm(uint16_t* h, const uint16_t* x, int64_t rows, int64_t D, const uint16_t* w, float eps,
                  uint16_t* out, cudaStream_t s);
// Backend::qk_norm_rope_cache for full-head RoPE in one launch; false when
// head_dim is not 32/64/128/256 (the caller composes the plain ops).
bool qk_norm_rope_kv(const uint16_t* q, const uint16_t* k, const uint16_t* v, int T, int H, int Hkv, int hd,
                     const uint16_t* qn, const uint16_t* kn, float eps, const float* inv_freq, bool traditional,
                     int pos0, const int* dpos, uint16_t* q_out, uint16_t* kc, uint16_t* vc, int64_t cap,
                     cudaStream_t s);
void rope(uint16_t* x, int T, int heads, int head_dim, int rot_offset, int rot_dims, int pos0, const int* dpos,
          const float* inv_freq, bool traditional, cudaStream_t s);
// Backend::mla_rope_split_cache in one launch (traditional RoPE): q
// [T, heads·(nope+rope)] -> q_nope [T, heads·nope], q_pe [T, heads·rope] (roped);
// ckv [T, kv_lora+rope] -> rms_norm(latent) into kc and the roped key into vc
// (one-head latent cache, rows of kv_lora / rope) at positions pos0...
void mla_rope_split_cache(const uint16_t* q, const uint16_t* ckv, int T, int heads, int nope, int rope, int kv_lora,
                          const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0, const int* dpos,
                          uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc, int64_t cap, cudaStream_t s);
// Backend::linear_mla_rope_split_cache at one token: linear(x, m) (m: the
// q_b projection, heads·(nope + rope) rows) then mla_rope_split_cache on it
// and ckv's row, in one launch with those ops' bits. Only where
// linear_mla_split_fits() says so: m takes the scalar decode kernel with its
// rows preloaded, nope and rope even (and ZMLX_CUDA_FUSED_MLA_SPLIT is not 0).
bool linear_mla_split_fits(const QMat& m, int heads, int nope, int rope);
void linear_mla_rope_split_cache(const uint16_t* x, const QMat& m, const uint16_t* ckv, int nope, int rope,
                                 int kv_lora, const uint16_t* kv_norm, float eps, const float* inv_freq, int pos0,
                                 const int* dpos, uint16_t* q_nope, uint16_t* q_pe, uint16_t* kc, uint16_t* vc,
                                 int64_t cap, cudaStream_t s);
void add(uint16_t* h, const uint16_t* x, int64_t n, cudaStream_t s);
void swiglu(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* out, cudaStream_t s);

// Cache layout [kv_heads, capacity, head_dim].
void kv_write(uint16_t* kc, uint16_t* vc, int64_t capacity, int kv_heads, int head_dim, int v_dim, const uint16_t* k,
              const uint16_t* v, int T, int pos0, const int* dpos, cudaStream_t s);
// The flash-decoding merge: the `splits` partials (m, l, acc[D]) of every
// (token, head) in scratch -> out [T, heads·D] bf16. attention, attention_pe
// and mla.cu's decode kernels write partials in this layout.
void merge_attention_splits(const float* scratch, int T, int heads, int D, int splits, uint16_t* out, cudaStream_t s);
// Which of two same-bits forms a call takes, so the tests that compare the
// forms can check that the faster one is the one they ran: the merge holds
// every split in registers (ZMLX_CUDA_MERGE_REGS=0: never), and the
// transposed multi_linear at < 16 tokens gives each row fewer than 32 lanes
// (ZMLX_CUDA_SHORT_ROWS=0: never). Both read their switch at every call.
bool merge_in_registers(int splits);
bool multi_linear_short_rows(int bits, int64_t cols);
// How a one-token grouped attention launch runs its kv groups' splits
// (attention_cluster): off — a block a split, then the merge kernel;
// merge — each group's splits one thread-block cluster that merges its
// partials itself (the same bits); launch — the cluster without that merge
// (ZMLX_CUDA_ATTN_CLUSTER=launch, a measurement).
enum class AttnCluster { off, merge, launch };
AttnCluster attention_cluster(int heads, int kv_heads, int head_dim, int64_t capacity, int splits);
// Beside merging clusters of more splits than this, a one-token step keeps
// its q/k norm + RoPE a kernel apart from the attention (the backend's
// norm_rope_attention, measured faster there); at this many or fewer it
// fuses them, as everywhere else (measured at 4: docs/performance.md).
constexpr int kFusedPrepClusterSplits = 4;
// 64 cache rows a split, from `at_least` to at most 128 (the merge's limit):
// the decode attentions' split count by capacity (GLM's absorbed attention
// asks for at least 16; decode_attention_splits starts from it).
int splits_by_rows(int64_t capacity, int at_least = 1);
// The key splits of a one-token GQA attention over a cache of `capacity`
// rows (a function of the shapes and the card alone, so eager and replayed
// steps agree): 64 rows a split, at most kMaxMergeSplits (128) — except
// where the grouped kernel streams its splits (holding one whole would take
// more shared memory than streaming it: Qwen3 past 12,288 positions), which
// take as many splits as one wave of its blocks holds (H200: 3 blocks an SM
// over 132 SMs, 99 splits for 4 kv heads). Against 128 splits after a
// 16,384- and a 32,768-token prompt, 96 gave Qwen3 +6 % and +5 % decode
// (one H200, 2026-11-28). ZMLX_CUDA_ATTN_WAVE_SPLITS=0 or
// ZMLX_CUDA_ATTN_STREAM=0: capacity / 64 splits everywhere, at most 128
// (A/B runs; read per call).
int decode_attention_splits(int heads, int kv_heads, int head_dim, int64_t capacity);
// Whether a one-token GQA step of these shapes takes the grouped
// tensor-core kernel at this split count (its switches and the card's
// shared memory decide; kernels.cu).
bool attention_by_group(int heads, int kv_heads, int head_dim, int64_t capacity, int splits);
// Whether gather_combine with this down projection, k slots and routing
// issues both weight steps of every warp before its programmatic-launch
// wait (groups of 64+, at most two steps a warp, one pass; the routing
// complete before the previous kernel; ZMLX_CUDA_TWO_STEP_COMBINE=0: never).
// The same bits as the general form.
bool combine_two_steps(const QMat& down, int k, bool routing_ready);
// Whether gather_combine_shared takes the 16-warp two-step form capped at 88
// registers (so a block fits beside a gate+up block; ZMLX_CUDA_COMBINE_REG_CAP=0:
// never). The same bits as the uncapped form.
bool combine_shared_capped(const QMat& down, int k, bool routing_ready);
// Causal GQA attention, split over `splits` key ranges per (token, head)
// (flash-decoding) and merged; scratch holds T·heads·splits·(head_dim + 2) floats.
// One token with 2–8 heads a kv group and head_dim 64 or 128 runs on tensor
// cores, a block per (kv group, split) (ZMLX_CUDA_GROUP_ATTN=0: the per-head
// kernel; read per launch).
void attention(const uint16_t* q, int T, int heads, int kv_heads, int head_dim, const uint16_t* kc,
               const uint16_t* vc, int64_t capacity, int pos0, const int* dpos, float scale, int splits,
               float* scratch, uint16_t* out, cudaStream_t s);

// One decode step (T = 1) of qk_norm_rope_kv + attention in one kernel (+
// the merge): q, k, v raw from the projection; the new key and value go to
// the cache as qk_norm_rope_kv writes them; head_dim in {64, 128, 256}.
void attention_decode_prep(const uint16_t* q, const uint16_t* k, const uint16_t* v, int heads, int kv_heads,
                           int head_dim, const uint16_t* qn, const uint16_t* kn, float eps, const float* inv_freq,
                           bool traditional, uint16_t* kc, uint16_t* vc, int64_t capacity, int pos0, const int* dpos,
                           float scale, int splits, float* scratch, uint16_t* out, cudaStream_t s);

void route_softmax(const uint16_t* logits, int T, int E, int k, bool normalize, int32_t* experts, uint16_t* scores,
                   cudaStream_t s);
void route_sigmoid(const uint16_t* logits, const float* bias, int T, int E, int k, bool normalize, float eps,
                   float scaling, int32_t* experts, uint16_t* scores, cudaStream_t s);

// GLM-4.7-Flash (multi-latent attention): see the Backend ops of the same names.
void attention_pe(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* q_pe, const uint16_t* k_pe,
                  int T, int heads, int kv_heads, int dk, int dv, int dr, int pos0, const int* dpos, float scale,
                  int splits, float* scratch, uint16_t* out, cudaStream_t s);
// x rows of ldx values; head h reads from column h·xoff (xoff 0: shared input).
void multi_linear(const uint16_t* x, int T, int64_t ldx, int64_t xoff, int H, const QMat& w, bool transpose,
                  uint16_t* out, cudaStream_t s);
void slice_cols(const uint16_t* x, int64_t T, int64_t cols, int64_t group, int64_t offset, int64_t width,
                uint16_t* out, cudaStream_t s);
void route_sigmoid_grouped(const uint16_t* logits, const float* bias, int T, int E, int k, int n_group, int topk_group,
                           bool normalize, float eps, float scaling, int32_t* experts, float* scores, cudaStream_t s);

// argmax of x[V] (bf16), ties to the lower id, into *out.
void argmax(const uint16_t* x, int64_t V, int32_t* out, cudaStream_t s);
// argmax for chained greedy steps: the id becomes the next step's input
// (step[0] = id, step[1] += 1) and lands in ring[old step[1] % ring_len]
// (mapped host memory the host reads by position).
void argmax_chain(const uint16_t* x, int64_t V, int32_t* step, int32_t* ring, int ring_len, cudaStream_t s);

// LFM2 short conv (see Backend::short_conv); state [L-1, C] updated in place.
void short_conv(const uint16_t* bcx, int T, int C, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                cudaStream_t s);
// Backend::linear_short_conv at one token: linear(x, m) (m: [B | C | x]
// rows, 3C of them) then short_conv, in one launch with those ops' bits.
// Only where linear_short_conv_fits() says so: m takes the MMA decode path
// with at most 4 splits a tile, C % 16 == 0, 2 <= L <= 8 (and
// ZMLX_CUDA_FUSED_CONV is not 0).
bool linear_short_conv_fits(const QMat& m, int64_t C, int L);
void linear_short_conv(const uint16_t* x, const QMat& m, uint16_t* state, const uint16_t* w, int L, uint16_t* out,
                       cudaStream_t s);

// Whether this process's launches use programmatic dependent launch
// (device_common.cuh, pdl_enabled), and the PTX target its kernels were
// built from (80 for an sm_80-only build, 90 for sm_90a), for the test that
// an sm_80 build on a Hopper card launches without it.
bool programmatic_launch_on();
int kernels_ptx_version();

// Points this file's kernels (and mla.cu's) at a device KernelTraceBuf, or
// nullptr to stop (kernel_trace.h; only a -DZMLX_KERNEL_TRACE=ON build records).
void kernel_trace_arm(void* device_buf);

}  // namespace zmlx::cuda::k
