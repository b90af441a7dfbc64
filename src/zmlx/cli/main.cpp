// zmlx — run mixture-of-experts LLMs from mlx-community checkpoints.
#include <algorithm>
#include <cstdio>

#include "zmlx/cli/command.h"
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"

namespace zmlx::cli {
std::vector<CommandInfo>& command_registry() {
  static std::vector<CommandInfo> r;
  return r;
}
}  // namespace zmlx::cli

int main(int argc, char** argv) {
  using namespace zmlx::cli;
  CLI::App app{"zmlx: fast, faithful mixture-of-experts inference (MLX checkpoints on CPUs and NVIDIA GPUs)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "zmlx 0.1.0");
  auto& reg = command_registry();
  std::sort(reg.begin(), reg.end(), [](auto& a, auto& b) { return a.name < b.name; });
  std::function<int()> chosen;
  for (auto& c : reg) {
    CLI::App* sub = app.add_subcommand(c.name, c.help);
    auto run = std::make_shared<std::function<int()>>(c.setup(*sub));
    sub->callback([run, &chosen] { chosen = *run; });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  int rc = 0;
  bool ok = true;
  try {
    rc = chosen ? chosen() : 0;
  } catch (const zmlx::Error& e) {
    std::fprintf(stderr, "zmlx: error: %s\n", e.what());
    rc = 1;
    ok = false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "zmlx: internal error: %s\n", e.what());
    rc = 2;
    ok = false;
  }
  // Multi-process: a failed rank ends the whole job (MPI_Abort) so no peer waits on it.
  zmlx::dist::finalize(ok);
  return rc;
}
