#include "zmlx/ops/weight.h"

namespace zmlx {

uint64_t Weight::bytes_per_matrix() const {
  if (!quantized) return uint64_t(rows) * cols * 2;
  return uint64_t(rows) * (words_per_row() * 4 + groups_per_row() * 4);
}

static Tensor slice0(const Tensor& t, int64_t i) {
  Tensor s = t;
  int64_t per = t.numel() / t.shape[0];
  s.shape.erase(s.shape.begin());
  s.data = static_cast<uint8_t*>(t.data) + size_t(i) * per * dtype_size(t.dtype);
  return s;
}

Weight Weight::expert(int64_t e) const {
  Weight m = *this;
  m.experts = 0;
  m.w = slice0(w, e);
  if (quantized) {
    m.scales = slice0(scales, e);
    m.biases = slice0(biases, e);
  }
  if (!tiles.empty()) {
    m.tiles = slice0(tiles, e);
    m.tile_scales = slice0(tile_scales, e);
    m.tile_biases = slice0(tile_biases, e);
  }
  return m;
}

}  // namespace zmlx
