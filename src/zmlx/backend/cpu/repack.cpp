#include "zmlx/backend/cpu/repack.h"

#include <cstring>
#include <vector>

namespace zmlx::cpu {

bool can_repack(const Weight& w) {
  return w.quantized && w.q.bits == 4 && w.rows % 16 == 0 && w.cols % 8 == 0 && w.q.group_size % 8 == 0 &&
         !w.lookup_only;
}

void repack_rows16(Weight& w) {
  const int64_t E = w.experts > 0 ? w.experts : 1, R = w.rows, K = w.cols, G = K / w.q.group_size;
  const int64_t wpr = K / 8;  // uint32 words per row
  std::vector<int64_t> tshape = {E * R * K / 2}, sshape = {E * R * G};
  w.tiles = host_tensor(DType::U8, tshape);
  w.tile_scales = host_tensor(DType::BF16, sshape);
  w.tile_biases = host_tensor(DType::BF16, sshape);
  const uint32_t* src = w.w.ptr<uint32_t>();
  const uint16_t* ss = w.scales.ptr<uint16_t>();
  const uint16_t* sb = w.biases.ptr<uint16_t>();
  uint8_t* dst = w.tiles.ptr<uint8_t>();
  uint16_t* ds = w.tile_scales.ptr<uint16_t>();
  uint16_t* db = w.tile_biases.ptr<uint16_t>();
  const int64_t tiles = E * R / 16;
#pragma omp parallel
  {
    std::vector<uint8_t> nib(static_cast<size_t>(16 * K));  // the tile's codes, one per byte
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t row0 = t * 16;
      for (int i = 0; i < 16; ++i) {
        const uint32_t* wr = src + (row0 + i) * wpr;
        uint8_t* out = nib.data() + i * K;
        for (int64_t c = 0; c < wpr; ++c)
          for (int n = 0; n < 8; ++n) out[c * 8 + n] = uint8_t((wr[c] >> (4 * n)) & 0xf);
      }
      uint16_t* tile = reinterpret_cast<uint16_t*>(dst + t * (K / 8) * 64);
      for (int64_t k = 0; k < K / 8; ++k)
        for (int i = 0; i < 16; ++i) {
          const uint8_t* r = nib.data() + i * K + k * 8;
          for (int e = 0; e < 2; ++e)
            tile[k * 32 + 2 * i + e] =
                uint16_t(r[e] | (r[2 + e] << 4) | (r[4 + e] << 8) | (r[6 + e] << 12));
        }
    for (int64_t g = 0; g < G; ++g)
      for (int i = 0; i < 16; ++i) {
        ds[(t * G + g) * 16 + i] = ss[(row0 + i) * G + g];
        db[(t * G + g) * 16 + i] = sb[(row0 + i) * G + g];
      }
    }
  }
}

}  // namespace zmlx::cpu
