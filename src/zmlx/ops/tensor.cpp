#include "zmlx/ops/tensor.h"

#include <fmt/format.h>

#include <cstdlib>
#include <new>

namespace zmlx {

std::string Tensor::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

Tensor host_tensor(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  t.storage = std::shared_ptr<void>(p, std::free);
  t.data = p;
  return t;
}

}  // namespace zmlx
