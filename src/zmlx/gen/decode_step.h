// One decode step through Backend::decode_step, so backends that record
// steps (CUDA graphs) can replay them. The recording key covers everything a
// recorded step bakes in: the model, the identity of its feed-forward
// modules (patched or not) and the addresses/capacities of the cache buffers.
#pragma once
#include "zmlx/models/model.h"

namespace zmlx {

// Same result as model.forward(be, {token}, cache); advances cache.pos.
Tensor decode_forward(Model& model, Backend& be, int32_t token, Cache& cache);

}  // namespace zmlx
