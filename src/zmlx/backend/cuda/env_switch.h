// The CUDA backend's environment switches (host code). Most are A/B
// off-switches: a faster path stays on unless its variable is "0"
// (ZMLX_CUDA_PRELOAD=0, ZMLX_GEMM_SPLIT=0, ...); docs/architecture.md lists
// them. Callers that must agree for a whole process cache the value
// (`static const bool on = env_on(...)`); the others read it per call, so a
// test can compare both paths in one process.
#pragma once
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace zmlx::cuda {

// Whether environment variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// On unless `name` is "0".
inline bool env_on(const char* name) { return !env_is(name, "0"); }

// The whole number in `name`, from lo to hi (unset or empty: fallback);
// anything else throws, naming the variable and the range.
inline long env_count(const char* name, long fallback, long lo, long hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(v, &end, 10);
  if (*end != '\0' || errno == ERANGE || n < lo || n > hi)
    throw std::runtime_error(std::string(name) + ": not a count from " + std::to_string(lo) + " to " +
                             std::to_string(hi) + ": " + v);
  return n;
}

}  // namespace zmlx::cuda
