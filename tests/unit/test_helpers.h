// Helpers shared by the unit tests: seeded random data and tensors, temporary
// directories, and scoped environment switches.
#pragma once
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "zmlx/core/dtype.h"
#include "zmlx/ops/tensor.h"
#include "zmlx/ops/weight.h"

namespace zmlx::test {

// A fresh directory under the system temp dir, removed with everything in it
// when the test ends.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "tmp") {
    std::string tmpl = (std::filesystem::temp_directory_path() / ("zmlx_" + tag + "_XXXXXX")).string();
    EXPECT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl;
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// Sets an environment variable (value nullptr: unsets it) for the guard's
// lifetime, then restores what was there before, even when an assertion
// returns early: a switch never leaks into later tests.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = ::getenv(name)) had_ = true, old_ = old;
    set(value);
  }
  ~ScopedEnv() { had_ ? ::setenv(name_.c_str(), old_.c_str(), 1) : ::unsetenv(name_.c_str()); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  // A new value (nullptr: unset); the destructor still restores the state
  // from before the constructor.
  void set(const char* value) { value ? ::setenv(name_.c_str(), value, 1) : ::unsetenv(name_.c_str()); }

 private:
  std::string name_, old_;
  bool had_ = false;
};

inline std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n, float std = 1.0f) {
  std::normal_distribution<float> d(0.f, std);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f32_to_bf16_bits(d(rng));
  return v;
}

inline Tensor bf16_tensor(const std::vector<uint16_t>& v, std::vector<int64_t> shape) {
  Tensor t = host_tensor(DType::BF16, std::move(shape));
  std::copy(v.begin(), v.end(), t.ptr<uint16_t>());
  return t;
}

// A random MLX-affine weight (random codes, scales of both signs).
inline Weight random_qweight(std::mt19937& rng, int64_t experts, int64_t rows, int64_t cols, int bits, int group,
                             const std::string& name = "w") {
  // As the loader demands of a checkpoint: whole groups and words a row (a
  // kernel reads a row's groups as cols / group; compute-sanitizer caught a
  // test weight of 160 columns in groups of 64 read past its scales).
  if (group <= 0 || cols % group != 0 || (cols * bits) % 32 != 0)
    throw std::invalid_argument("random_qweight: " + std::to_string(cols) + " columns are not whole groups of " +
                                std::to_string(group) + " and 32-bit words of " + std::to_string(bits) + "-bit values");
  Weight w;
  w.name = name;
  w.experts = experts;
  w.rows = rows;
  w.cols = cols;
  w.quantized = true;
  w.q = {bits, group};
  const int64_t E = experts > 0 ? experts : 1;
  std::vector<int64_t> ws = {rows, cols * bits / 32}, ss = {rows, cols / group};
  if (experts > 0) ws.insert(ws.begin(), experts), ss.insert(ss.begin(), experts);
  w.w = host_tensor(DType::U32, ws);
  w.scales = host_tensor(DType::BF16, ss);
  w.biases = host_tensor(DType::BF16, ss);
  for (int64_t i = 0; i < w.w.numel(); ++i) w.w.ptr<uint32_t>()[i] = uint32_t(rng());
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  const float n = float((1 << bits) - 1);
  for (int64_t i = 0; i < w.scales.numel(); ++i) {
    float s = u(rng) * 0.05f / n * 4.f * ((rng() & 1) ? -1.f : 1.f);
    w.scales.ptr<uint16_t>()[i] = f32_to_bf16_bits(s);
    w.biases.ptr<uint16_t>()[i] = f32_to_bf16_bits(-s * n / 2 + 0.01f * (u(rng) - 1.f));
  }
  (void)E;
  return w;
}

inline Weight random_dense_weight(std::mt19937& rng, int64_t experts, int64_t rows, int64_t cols,
                                  const std::string& name = "w") {
  Weight w;
  w.name = name;
  w.experts = experts;
  w.rows = rows;
  w.cols = cols;
  std::vector<int64_t> s = {rows, cols};
  if (experts > 0) s.insert(s.begin(), experts);
  w.w = host_tensor(DType::BF16, s);
  auto v = random_bf16(rng, size_t(w.w.numel()), 0.05f);
  std::copy(v.begin(), v.end(), w.w.ptr<uint16_t>());
  return w;
}

inline void poison(Tensor& t) {
  uint8_t* p = static_cast<uint8_t*>(t.data);
  std::fill(p, p + t.nbytes(), 0xff);  // NaN patterns in every float type
}

}  // namespace zmlx::test
