// Row-interleaved layout for 4-bit MLX weights, built once at load time by the
// CPU backend when AVX-512 is active (ZMLX_CPU_REPACK=0 turns it off).
//
// Rows are grouped in tiles of 16. Inside a tile, every 8 columns occupy 64
// bytes = 32 little-endian 16-bit words; word 2i+e (row i < 16, e < 2) holds
// four nibbles, nibble n (bits 4n..4n+3) = q[row i][c + 2n + e]. Shifting a
// word so nibble n lands in bits 3..6 and OR-ing 0x3F80 gives the bf16 value
// 1 + q/16 exactly, so one 64-byte load and eight bitwise ops (no shuffles)
// yield, for each column pair n, the lanes [row0 c, row0 c+1, row1 c, ...]
// that vdpbf16ps accumulates against a broadcast pair of x values.
// Scales and biases per tile: [groups][16 rows] bf16. The values are the
// checkpoint's own codes, scales and biases; only their order changes.
#pragma once
#include <cstdint>

#include "zmlx/ops/weight.h"

namespace zmlx::cpu {

// Whether `w` can be repacked (4-bit, rows % 16 == 0, group % 8 == 0).
bool can_repack(const Weight& w);
// Adds tiles/tile_scales/tile_biases to `w` (all experts). Multi-threaded.
void repack_rows16(Weight& w);

}  // namespace zmlx::cpu
