#include "zmlx/ops/tensor.h"

#include <fmt/format.h>

#include <sys/mman.h>

#include <cstdlib>
#include <new>

#include "zmlx/core/error.h"

namespace zmlx {

std::string Tensor::shape_str() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

Tensor last_row(const Tensor& t) {
  Tensor r = t;
  r.shape = {1, t.cols()};
  r.data = static_cast<uint8_t*>(t.data) + size_t(t.rows() - 1) * size_t(t.cols()) * dtype_size(t.dtype);
  return r;
}

Tensor first_rows(const Tensor& t, int64_t n) {
  ZMLX_CHECK(n >= 0 && n <= t.rows(), "first_rows: {} rows of a tensor with {}", n, t.rows());
  Tensor r = t;
  r.shape = {n, t.cols()};
  return r;
}

Tensor host_tensor(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  // Large buffers (weights in a repacked layout, big activations) are 2 MB
  // aligned and marked for transparent huge pages: fewer page faults when
  // they are filled, fewer TLB misses when decode streams through them.
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t align = t.nbytes() >= kHuge ? kHuge : 64;
  size_t bytes = (t.nbytes() + align - 1) / align * align;
  void* p = std::aligned_alloc(align, bytes ? bytes : align);
  if (!p) throw std::bad_alloc();
  if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);
  t.storage = std::shared_ptr<void>(p, std::free);
  t.data = p;
  return t;
}

}  // namespace zmlx
