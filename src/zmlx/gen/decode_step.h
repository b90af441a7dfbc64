// One decode step through Backend::decode_step, so backends that record
// steps (CUDA graphs) can replay them. The recording key covers everything a
// recorded step bakes in: the model, the identity of its feed-forward
// modules (patched or not) and the addresses/capacities of the cache buffers.
#pragma once
#include "zmlx/models/model.h"

namespace zmlx {

// Same result as model.forward(be, {token}, cache); advances cache.pos.
Tensor decode_forward(Model& model, Backend& be, int32_t token, Cache& cache);

// Greedy decoding without a host round trip per step (Backend::
// decode_step_chained): enqueues the step at cache.pos on `token`, or, when
// `token` < 0, on the token the previous chained step chose on the device;
// advances cache.pos. Read the chosen token with be.chained_token(pos).
void decode_forward_chained(Model& model, Backend& be, int32_t token, Cache& cache);

}  // namespace zmlx
