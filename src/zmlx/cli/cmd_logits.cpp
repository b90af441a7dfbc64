// zmlx logits MODEL --ids 1,2,3 --out F.npy: teacher-forced logits for every
// position, as float32 [T, V] in NumPy's .npy format (tools/oracle reads it).
#include <fstream>

#include "zmlx/cli/command.h"
#include "zmlx/cli/common.h"
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/gen/generator.h"

namespace zmlx::cli {
namespace {

void write_npy(const std::string& path, const std::vector<float>& data, int64_t rows, int64_t cols) {
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", rows, cols);
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  ZMLX_CHECK(f.good(), "cannot write {}", path);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t n = uint16_t(header.size());
  f.write(reinterpret_cast<const char*>(&n), 2);
  f << header;
  f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * 4));
}

ZMLX_COMMAND("logits", "Teacher-forced logits for a token sequence (.npy)", [](CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto ids = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto chunk = std::make_shared<int>(0);
  add_model_args(app, *a);
  app.add_option("--ids", *ids, "comma-separated token ids")->required();
  app.add_option("--out", *out, "output .npy path")->required();
  app.add_option("--chunk", *chunk, "feed the sequence in chunks of this many tokens (0 = all at once)");
  return [a, ids, out, chunk] {
    LoadedModel m = load(*a, false);
    const auto tokens = parse_id_list(*ids);
    ZMLX_CHECK(!tokens.empty(), "--ids is empty");
    Cache cache = m.model->new_cache(*m.backend);
    const int64_t V = m.model->config().vocab_size, T = int64_t(tokens.size());
    std::vector<float> all;
    const size_t step = *chunk > 0 ? size_t(*chunk) : tokens.size();
    for (size_t i = 0; i < tokens.size(); i += step) {
      std::vector<int32_t> part(tokens.begin() + i, tokens.begin() + std::min(tokens.size(), i + step));
      Tensor l = m.model->forward(*m.backend, part, cache, /*all_logits=*/true);
      if (l.empty()) continue;  // pipeline: only the last stage has logits
      for (int64_t r = 0; r < l.rows(); ++r) {
        auto row = logits_to_host(*m.backend, l, r);
        all.insert(all.end(), row.begin(), row.end());
      }
    }
    const dist::Placement& P = m.model->placement();
    if (P.active() && P.rank != P.logits_rank()) return 0;
    write_npy(*out, all, T, V);
    std::fprintf(stderr, "[zmlx] wrote %s: logits [%ld, %ld]\n", out->c_str(), long(T), long(V));
    return 0;
  };
});

}  // namespace
}  // namespace zmlx::cli
