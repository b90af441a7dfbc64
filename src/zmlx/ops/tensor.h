// Tensor: a typed, shaped, contiguous buffer owned (shared) by whoever
// allocated it — a backend's allocator or a memory-mapped checkpoint file.
// Shapes are row-major; activations are [tokens, features].
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "zmlx/core/dtype.h"

namespace zmlx {

enum class Device : uint8_t { CPU, CUDA };

struct Tensor {
  DType dtype = DType::BF16;
  std::vector<int64_t> shape;
  Device device = Device::CPU;
  std::shared_ptr<void> storage;  // keeps `data` alive
  void* data = nullptr;

  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int64_t rows() const { return shape.empty() ? 1 : numel() / shape.back(); }
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  bool empty() const { return data == nullptr; }
  template <typename T> T* ptr() { return static_cast<T*>(data); }
  template <typename T> const T* ptr() const { return static_cast<const T*>(data); }
  std::string shape_str() const;
};

// A [1, cols] view of the last row of a 2-D tensor (no copy).
Tensor last_row(const Tensor& t);

// A [n, cols] view of the first n rows of a tensor read as [rows, cols]
// (no copy; e.g. the filled part of a one-head KV cache).
Tensor first_rows(const Tensor& t, int64_t n);

// Host allocation, 64-byte aligned (SIMD loads); contents uninitialised.
Tensor host_tensor(DType dtype, std::vector<int64_t> shape);

}  // namespace zmlx
