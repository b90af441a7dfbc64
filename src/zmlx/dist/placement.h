// Placement: where this process sits in a multi-process run — which
// parallelism, which rank of how many, and (pipeline) which contiguous range
// of layers it holds. It travels inside ModelConfig so every family builder
// sees it without a signature change; families that do not support a
// parallelism leave `handled` false and load_model() refuses.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace zmlx::dist {

class Communicator;

enum class Mode { None, Pipeline, Tensor };
const char* mode_name(Mode m);

struct Placement {
  Mode mode = Mode::None;
  std::shared_ptr<Communicator> comm;  // null when mode == None
  int rank = 0, size = 1;
  // Pipeline: [begin, end) layers of every rank (filled by load_model), and
  // the --layers text when the split was given by hand ("" = by weight bytes).
  std::vector<std::pair<int64_t, int64_t>> stages;
  std::string layers_arg;
  // Every rank's device (its backend's name, e.g. "cuda:1 (NVIDIA H100 ...)"),
  // gathered when the backends are made (make_backend_for_ranks); empty before.
  std::vector<std::string> devices;

  bool active() const { return mode != Mode::None; }
  bool pipeline() const { return mode == Mode::Pipeline; }
  bool tensor() const { return mode == Mode::Tensor; }
  int64_t layer_begin() const { return pipeline() ? stages.at(size_t(rank)).first : 0; }
  int64_t layer_end(int64_t n_layers) const { return pipeline() ? stages.at(size_t(rank)).second : n_layers; }
  bool owns_layer(int64_t l) const {
    return !pipeline() || (l >= stages.at(size_t(rank)).first && l < stages.at(size_t(rank)).second);
  }
  bool first_stage() const { return !pipeline() || rank == 0; }
  bool last_stage() const { return !pipeline() || rank == size - 1; }
  // The rank that holds the logits and samples (the last pipeline stage; rank 0 otherwise).
  int logits_rank() const { return pipeline() ? size - 1 : 0; }
  // Tensor parallel: this rank's shard index and the shard count (0 of 1 otherwise).
  int tp_index() const { return tensor() ? rank : 0; }
  int tp_count() const { return tensor() ? size : 1; }
  // "rank 1/2 layers 24-47" | "rank 0/2 tensor shard 1/2" | "single process",
  // followed by " on DEVICE" once `devices` is known.
  std::string describe() const;
};

// Contiguous layer ranges for `n` stages balancing the per-layer weight
// bytes (every stage gets at least one layer). Throws when layers < n.
std::vector<std::pair<int64_t, int64_t>> split_layers_by_bytes(const std::vector<uint64_t>& layer_bytes, int n);
// Parses "0-23,24-47" (inclusive ranges) and checks that the ranges are
// contiguous, cover [0, n_layers) and number exactly `n`.
std::vector<std::pair<int64_t, int64_t>> parse_layer_ranges(const std::string& s, int64_t n_layers, int n);

}  // namespace zmlx::dist
