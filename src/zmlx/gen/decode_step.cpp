#include "zmlx/gen/decode_step.h"

#include "zmlx/core/error.h"

namespace zmlx {
namespace {

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

}  // namespace

Tensor decode_forward(Model& model, Backend& be, int32_t token, Cache& cache) {
  const int64_t pos = cache.pos;
  // A replayed step runs no host checks: check the token here.
  ZMLX_CHECK(token >= 0 && token < model.config().vocab_size, "token id {} is outside the vocabulary [0, {})", token,
             model.config().vocab_size);
  uint64_t key = mix(0, model.uid());
  for (auto* slot : model.feed_forwards()) key = mix(key, reinterpret_cast<uintptr_t>(slot->get()));
  for (const KvLayer& kv : cache.kv) {
    // A step that must grow a KV layer changes its buffers: run it eagerly.
    if (!kv.k.empty() && pos + 1 > kv.capacity) return model.forward(be, {token}, cache);
    key = mix(key, reinterpret_cast<uintptr_t>(kv.k.data));
    key = mix(key, reinterpret_cast<uintptr_t>(kv.v.data));
    key = mix(key, uint64_t(kv.capacity));
  }
  for (const Tensor& c : cache.conv) key = mix(key, reinterpret_cast<uintptr_t>(c.data));
  // The step resets the position itself, so a backend may run it again (e.g.
  // eagerly after a failed recording).
  Tensor out = be.decode_step(key, token, pos, [&] {
    cache.pos = pos;
    return model.forward(be, {token}, cache);
  });
  cache.pos = pos + 1;  // a replayed step does not run the host code that advances it
  return out;
}

}  // namespace zmlx
