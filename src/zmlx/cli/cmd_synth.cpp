// zmlx synth --arch qwen3_moe --preset tiny|full --out DIR: a random-weight
// model in the mlx-community layout.
#include <unistd.h>

#include <chrono>

#include "zmlx/cli/command.h"
#include "zmlx/core/error.h"
#include "zmlx/synth/synth.h"

namespace zmlx::cli {
namespace {

ZMLX_COMMAND("synth", "Write a random-weight model in the mlx-community layout", [](CLI::App& app) {
  auto o = std::make_shared<synth::SynthOptions>();
  auto sets = std::make_shared<std::vector<std::string>>();
  app.add_option("--arch", o->arch, "model family")->check(CLI::IsMember(synth::synth_archs()));
  app.add_option("--preset", o->preset, "tiny (seconds to run) or full (the real shapes)")
      ->check(CLI::IsMember({"tiny", "full"}));
  app.add_option("--out", o->out, "output directory")->required();
  app.add_option("--seed", o->seed, "random seed (same seed, same bytes)");
  app.add_option("--bits", o->bits, "quantization bits: 2, 4, 8 (0 = bf16 weights)");
  app.add_option("--group-size", o->group_size, "quantization group size: 32, 64, 128");
  app.add_option("--router-bits", o->router_bits, "router bits, written as a per-module override (0 = same)");
  app.add_option("--set", *sets, "override a config field, KEY=VALUE (VALUE parsed as JSON)");
  app.add_option("--tokenizer", o->tokenizer_dir, "copy tokenizer files from this directory");
  return [o, sets] {
    for (auto& s : *sets) {
      auto eq = s.find('=');
      ZMLX_CHECK(eq != std::string::npos && eq > 0, "--set expects KEY=VALUE, got '{}'", s);
      o->sets.emplace_back(s.substr(0, eq), s.substr(eq + 1));
    }
    o->progress = isatty(2);
    auto t0 = std::chrono::steady_clock::now();
    std::string dir = synth::synth_model(*o);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "[zmlx] wrote %s (%s preset, %s) in %.1fs\n", dir.c_str(), o->preset.c_str(),
                 o->arch.c_str(), s);
    return 0;
  };
});

}  // namespace
}  // namespace zmlx::cli
