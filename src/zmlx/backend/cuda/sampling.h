// Temperature sampling on the GPU: the algorithm of gen/sampler.h (the same
// arithmetic, gen/sampling_math.h), so the token is the one the host's
// sample_logits picks from the same logits, seed and draw. One row of bf16
// logits in, one token out; nothing else crosses to the host, so chained
// decoding (Backend::decode_step_chained) runs sampled steps back to back as
// it does greedy ones, with the sampler inside the recorded step.
//
// Work: the penalized logits' order keys, a radix sort of (key, id) (CUB;
// two 8-bit passes without a penalty, as bf16 logits' keys differ only in
// their top 16 bits, four with one), each candidate's integer weight and
// their running sum (CUB), then one block finds the cuts and the pick by
// parallel search. Counting 16-bit bins instead of sorting was tried twice
// and not kept: one block scanning all 65,536 bins, 70-79 us; coarse bins
// first and fine ones only where a cut or the pick falls (branch
// exp/sampler-bins), 58 us against this sort's 43 on 151,936 finite logits.
#pragma once
#include <cstddef>
#include <cstdint>

#include "zmlx/gen/sampling_math.h"

typedef struct CUstream_st* cudaStream_t;

namespace zmlx::cuda::k {

// The largest repetition window sampled on the GPU (a longer one samples
// on the host).
constexpr int kMaxSamplingWindow = 1024;

// What the kernels read and update, in device memory: the options, the
// next draw of the seed's stream, and the ids the repetition penalty sees
// (a ring of the last params.window_cap tokens; a picked token enters it,
// evicting the oldest once the ring is full).
struct SamplingState {
  sampling::Params params;
  uint64_t draw = 0;
  int32_t window_len = 0, window_head = 0;  // head: the oldest entry once full
  // How often the output holds each id (frequency and presence penalties),
  // and how often the window does (the repetition penalty's membership
  // test, O(1) an id): sampling::kMaxVocab entries each, kept in step with
  // the picks.
  int32_t* counts = nullptr;
  int32_t* window_counts = nullptr;
  int32_t window[kMaxSamplingWindow];
};

// counts[ids[i]] += 1 for i < n (ids out of [0, kMaxVocab) are skipped).
void add_token_counts(const int32_t* ids, int n, int32_t* counts, cudaStream_t s);

// Device buffers for rows of V logits (V <= sampling::kMaxVocab); `state`
// is the caller's (it outlives a change of V).
struct SamplingWorkspace {
  int64_t V = 0;
  uint32_t* keys = nullptr;  // [2V]: keys, sorted keys
  int32_t* ids = nullptr;    // [2V]: ids, sorted ids
  uint64_t* cum = nullptr;   // [V]: running weight in sorted order
  void* cub_temp = nullptr;
  size_t cub_bytes = 0;
  SamplingState* state = nullptr;
};
void sampling_workspace_alloc(SamplingWorkspace& ws, int64_t V);
void sampling_workspace_free(SamplingWorkspace& ws);

// Samples a token from `logits` (bf16 [V]) by ws.state. `p`: the host's
// copy of the params ws.state holds; the launches' shape depends on it (a
// 16- or 32-bit sort, fixed in a recording). The token goes to *out when
// out is set; with `step` set
// (chained decoding) it becomes the next step's input as argmax_chain's
// does: step[0] = token, ring[step[1] % ring_len] = token, step[1] += 1.
// The draw advances when the temperature is above 0, the token enters the
// window, and it is counted when the output's counts are kept.
void sample_token(const uint16_t* logits, SamplingWorkspace& ws, const sampling::Params& p, int32_t* out, int32_t* step,
                  int32_t* ring, int ring_len, cudaStream_t s);

}  // namespace zmlx::cuda::k
