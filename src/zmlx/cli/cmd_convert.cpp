// zmlx convert HF_DIR OUT_DIR: a Hugging Face checkpoint -> the MLX layout
// (4-bit affine by default, like mlx_lm.convert -q).
#include <fmt/format.h>

#include <memory>

#include "zmlx/cli/command.h"
#include "zmlx/convert/convert.h"
#include "zmlx/core/error.h"

namespace zmlx::cli {
namespace {

struct ConvertArgs {
  std::string source, output, dtype;
  int bits = 4, group_size = 64, router_bits = 0;
  double shard_gb = 5.0;
};

int run(const ConvertArgs& a, bool bits_given, bool group_given) {
  convert::ConvertOptions o;
  o.source = a.source;
  o.output = a.output;
  if (!a.dtype.empty()) {
    ZMLX_CHECK(a.dtype == "bf16" || a.dtype == "bfloat16",
               "[convert] --dtype {} is not supported (only bf16; leave it out to quantize)", a.dtype);
    ZMLX_CHECK(!bits_given && !group_given && a.router_bits == 0,
               "[convert] --dtype bf16 writes unquantized weights: it cannot be combined with --bits, "
               "--group-size or --quant-router-bits");
    o.quantize = false;
  }
  o.q = {a.bits, a.group_size};
  o.router_bits = a.router_bits;
  ZMLX_CHECK(a.shard_gb > 0, "[convert] --max-shard-gb must be positive");
  o.max_shard_bytes = uint64_t(a.shard_gb * double(1ull << 30));
  convert::ConvertResult r = convert::convert(o);
  fmt::print("converted {} ({}) -> {}\n", r.source_dir, r.family, a.output);
  const double mib = double(r.bytes_out) / double(1ull << 20);
  fmt::print("  {} tensors in, {} tensors out ({} quantized modules, {} bf16 tensors), {}\n", r.tensors_in,
             r.tensors_out, r.quantized_modules, r.bf16_tensors,
             mib >= 1024 ? fmt::format("{:.2f} GiB", mib / 1024) : fmt::format("{:.2f} MiB", mib));
  if (!r.copied_files.empty()) {
    std::string files;
    for (auto& f : r.copied_files) files += (files.empty() ? "" : ", ") + f;
    fmt::print("  copied {}\n", files);
  }
  return 0;
}

ZMLX_COMMAND("convert", "Convert a Hugging Face checkpoint to the MLX layout (affine 4-bit by default)",
             [](CLI::App& app) {
               auto a = std::make_shared<ConvertArgs>();
               app.add_option("hf_dir", a->source, "Hugging Face model directory or repo id in the HF cache")
                   ->required();
               app.add_option("out_dir", a->output, "Output directory (must not exist or be empty)")->required();
               CLI::Option* bits = app.add_option("--bits,-b", a->bits, "Quantization bits (2, 4, 8)")
                                       ->check(CLI::IsMember({2, 4, 8}));
               CLI::Option* group = app.add_option("--group-size,-g", a->group_size,
                                                   "Quantization group size (32, 64, 128)")
                                        ->check(CLI::IsMember({32, 64, 128}));
               app.add_option("--dtype", a->dtype, "bf16: write unquantized bf16 weights instead");
               app.add_option("--quant-router-bits", a->router_bits,
                              "Quantize the MoE router (mlp.gate / feed_forward.gate) with these bits; recorded as "
                              "a per-module override in config.json (default: like the other weights; 8 for "
                              "lfm2_moe, as mlx-lm; glm4_moe_lite's router always stays bf16)")
                   ->check(CLI::IsMember({2, 4, 8}));
               app.add_option("--max-shard-gb", a->shard_gb, "Largest safetensors shard, in GiB (default 5)");
               return [a, bits, group] { return run(*a, bits->count() > 0, group->count() > 0); };
             });

}  // namespace
}  // namespace zmlx::cli
