#include "zmlx/gen/decode_step.h"

#include "zmlx/core/error.h"

namespace zmlx {
namespace {

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

void check_token(const Model& model, int32_t token) {
  // A replayed step runs no host checks: check the token here.
  ZMLX_CHECK(token >= 0 && token < model.config().vocab_size, "token id {} is outside the vocabulary [0, {})", token,
             model.config().vocab_size);
}

// The recording key of a step at cache.pos, or 0 when the step must run
// eagerly (it grows a KV layer, which changes the cache buffers).
uint64_t step_key(Model& model, const Cache& cache) {
  const int64_t pos = cache.pos;
  uint64_t key = mix(0, model.uid());
  for (auto* slot : model.feed_forwards()) key = mix(key, reinterpret_cast<uintptr_t>(slot->get()));
  for (const KvLayer& kv : cache.kv) {
    if (!kv.k.empty() && pos + 1 > kv.capacity) return 0;
    key = mix(key, reinterpret_cast<uintptr_t>(kv.k.data));
    key = mix(key, reinterpret_cast<uintptr_t>(kv.v.data));
    key = mix(key, uint64_t(kv.capacity));
  }
  for (const Tensor& c : cache.conv) key = mix(key, reinterpret_cast<uintptr_t>(c.data));
  return key == 0 ? 1 : key;
}

}  // namespace

Tensor decode_forward(Model& model, Backend& be, int32_t token, Cache& cache) {
  const int64_t pos = cache.pos;
  check_token(model, token);
  // The step resets the position itself, so a backend may run it again (e.g.
  // eagerly after a failed recording). Key 0: not to be recorded.
  Tensor out = be.decode_step(step_key(model, cache), token, pos, [&] {
    cache.pos = pos;
    return model.forward(be, {token}, cache);
  });
  cache.pos = pos + 1;  // a replayed step does not run the host code that advances it
  return out;
}

void decode_forward_chained(Model& model, Backend& be, int32_t token, Cache& cache) {
  const int64_t pos = cache.pos;
  if (token >= 0) check_token(model, token);
  // A chained step's recording also holds its argmax: a key of its own.
  uint64_t key = step_key(model, cache);
  if (key != 0) key = mix(key, 0xc4a1u);
  be.decode_step_chained(key, token, pos, [&](int32_t t) {
    check_token(model, t);
    cache.pos = pos;
    return model.forward(be, {t}, cache);
  });
  cache.pos = pos + 1;
}

}  // namespace zmlx
