// Weight: the parameters of one Linear, Embedding or stacked-expert
// SwitchLinear, as found in an MLX checkpoint. Either MLX-affine quantized
// (packed uint32 + bf16 scales/biases) or dense bf16. Logical shape is
// [experts?, rows(out), cols(in)]; the contraction runs over cols.
#pragma once
#include <cstdint>
#include <string>

#include "zmlx/ops/tensor.h"
#include "zmlx/quant/affine.h"

namespace zmlx {

struct Weight {
  std::string name;          // module path, e.g. "model.layers.3.mlp.switch_mlp.up_proj"
  int64_t experts = 0;       // 0: a plain matrix; E: E stacked matrices
  int64_t rows = 0, cols = 0;
  bool quantized = false;
  quant::QuantParams q;      // valid when quantized
  Tensor w;                  // U32 packed, or BF16 dense
  Tensor scales, biases;     // BF16, quantized only
  // Embedding tables read by row lookup only (never multiplied): the CPU
  // backend leaves them in the checkpoint layout.
  bool lookup_only = false;
  // Optional backend-specific copy in a faster layout (CPU: 4-bit rows
  // interleaved in tiles of 16, see backend/cpu/repack.h). Same values.
  Tensor tiles, tile_scales, tile_biases;

  int64_t words_per_row() const { return cols * q.bits / 32; }
  int64_t groups_per_row() const { return cols / q.group_size; }
  // Bytes one matrix (one expert) occupies: what a mat-vec reads.
  uint64_t bytes_per_matrix() const;
  // The i-th expert as a plain matrix view (no copy).
  Weight expert(int64_t e) const;
  bool empty() const { return w.empty(); }
};

}  // namespace zmlx
