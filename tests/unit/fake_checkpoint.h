// A fake transformers checkpoint for convert tests: named tensors as fp32
// values that are exactly representable in their stored dtype (BF16 or F32),
// written as sharded safetensors the way transformers saves them.
#pragma once
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "zmlx/core/dtype.h"
#include "zmlx/io/safetensors.h"

namespace zmlx::test {

struct FakeCheckpoint {
  std::map<std::string, std::vector<int64_t>> shapes;
  std::map<std::string, std::vector<float>> values;
  std::map<std::string, DType> dtypes;

  // A tensor of N(off, sd) values, rounded to bf16 when stored as BF16.
  void add(const std::string& n, std::vector<int64_t> s, std::mt19937& rng, float sd = 0.05f, float off = 0.f,
           DType dt = DType::BF16) {
    int64_t c = 1;
    for (auto d : s) c *= d;
    std::normal_distribution<float> nd(off, sd);
    std::vector<float> v(static_cast<size_t>(c));
    for (auto& x : v) x = dt == DType::BF16 ? round_bf16(nd(rng)) : nd(rng);
    shapes[n] = std::move(s);
    values[n] = std::move(v);
    dtypes[n] = dt;
  }

  // Writes every tensor into dir in shards of about shard_bytes.
  void write_tensors(const std::filesystem::path& dir, size_t shard_bytes) const {
    std::vector<io::TensorSpec> specs;
    for (auto& [n, s] : shapes) specs.push_back({n, dtypes.at(n), s});
    io::write_model_weights(dir.string(), specs, [&](const io::TensorSpec& s, uint8_t* dst) {
      const auto& v = values.at(s.name);
      for (size_t i = 0; i < v.size(); ++i) {
        if (s.dtype == DType::F32) std::memcpy(dst + 4 * i, &v[i], 4);
        else reinterpret_cast<uint16_t*>(dst)[i] = f32_to_bf16_bits(v[i]);
      }
    }, shard_bytes, false, {{"format", "pt"}});
  }
};

}  // namespace zmlx::test
