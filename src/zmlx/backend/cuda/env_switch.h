// The CUDA backend's environment switches (host code). Most are A/B
// off-switches: a faster path stays on unless its variable is "0"
// (ZMLX_CUDA_PRELOAD=0, ZMLX_GEMM_SPLIT=0, ...); docs/architecture.md lists
// them. Callers that must agree for a whole process cache the value
// (`static const bool on = env_on(...)`); the others read it per call, so a
// test can compare both paths in one process.
#pragma once
#include <cstdlib>
#include <cstring>

namespace zmlx::cuda {

// Whether environment variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// On unless `name` is "0".
inline bool env_on(const char* name) { return !env_is(name, "0"); }

}  // namespace zmlx::cuda
