// Shared pieces of the subcommands that load a model.
#pragma once
#include <CLI/CLI.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "zmlx/models/model.h"
#include "zmlx/patch/patch.h"
#include "zmlx/text/tokenizer.h"

namespace zmlx::cli {

struct ModelArgs {
  std::string model;
  std::string backend = "auto";
  int threads = 0;
  // Patch control: the EXO_ZMLX* environment, overridden by these flags.
  int patch = -1;  // -1: from EXO_ZMLX; 0: --no-patch; 1: --patch
  std::string patterns, exclude;
  bool patch_verbose = false;
  // Multi-process (launched with mpirun -np N): none | pipeline | tensor.
  std::string parallel = "none";
  std::string layers;         // pipeline split by hand, e.g. "0-23,24-47"
  double dist_timeout = 60;   // seconds a rank waits for a peer before failing
};

void add_model_args(CLI::App& app, ModelArgs& a, bool with_patch_flags = true);

struct LoadedModel {
  LoadedModel() = default;
  LoadedModel(LoadedModel&&) = default;
  LoadedModel& operator=(LoadedModel&&) = default;
  // GPU ranks of a parallel run, destroyed by an error on its way to main()
  // (which prints it and aborts the job): the model and backend are left to
  // the exiting process instead of freed, since freeing GPU memory or
  // synchronising the stream could wait forever for NCCL work that depends
  // on a peer that died or hangs.
  ~LoadedModel();

  std::string dir;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::optional<text::Tokenizer> tokenizer;  // absent when the dir has no tokenizer.json
  double load_seconds = 0;
  patch::PatchReport patch_report;
  // Rank 0 (or a single process): the one that prints results.
  bool leader() const { return !model->placement().active() || model->placement().rank == 0; }
};

// The placement the --parallel flags ask for (starts MPI when active).
dist::Placement make_placement(const ModelArgs& a);

// The patch options the flags and environment ask for.
patch::PatchOptions patch_options(const ModelArgs& a);

LoadedModel load(const ModelArgs& a, bool need_tokenizer);

std::vector<int32_t> parse_id_list(const std::string& s);  // "1,2,3"
uint64_t peak_rss_bytes();
std::string human_bytes(double b);

}  // namespace zmlx::cli
