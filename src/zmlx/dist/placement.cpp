#include "zmlx/dist/placement.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"

namespace zmlx::dist {

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::None: return "none";
    case Mode::Pipeline: return "pipeline";
    case Mode::Tensor: return "tensor";
  }
  return "?";
}

std::string Placement::describe() const {
  if (!active()) return "single process";
  const std::string on = size_t(rank) < devices.size() ? " on " + devices[size_t(rank)] : "";
  if (pipeline())
    return fmt::format("rank {}/{} layers {}-{}{}", rank, size, stages.at(size_t(rank)).first,
                       stages.at(size_t(rank)).second - 1, on);
  return fmt::format("rank {}/{} tensor shard {}/{}{}", rank, size, rank + 1, size, on);
}

std::vector<std::pair<int64_t, int64_t>> split_layers_by_bytes(const std::vector<uint64_t>& bytes, int n) {
  const int64_t L = int64_t(bytes.size());
  ZMLX_CHECK(n >= 1, "pipeline: {} stages", n);
  ZMLX_CHECK(L >= n, "--parallel pipeline: the model has {} layers, fewer than the {} ranks", L, n);
  double total = 0;
  for (uint64_t b : bytes) total += double(b);
  std::vector<std::pair<int64_t, int64_t>> out;
  int64_t begin = 0;
  double acc = 0;
  for (int s = 0; s < n; ++s) {
    if (s == n - 1) {
      out.push_back({begin, L});
      break;
    }
    const double target = total * double(s + 1) / double(n);
    int64_t end = begin + 1;  // at least one layer
    acc += double(bytes[size_t(begin)]);
    // Take the next layer while that brings the cumulative sum closer to the
    // target, leaving at least one layer for each later stage.
    while (end < L - (n - 1 - s) && std::abs(acc + double(bytes[size_t(end)]) - target) <= std::abs(acc - target)) {
      acc += double(bytes[size_t(end)]);
      ++end;
    }
    out.push_back({begin, end});
    begin = end;
  }
  return out;
}

std::vector<std::pair<int64_t, int64_t>> parse_layer_ranges(const std::string& s, int64_t n_layers, int n) {
  std::vector<std::pair<int64_t, int64_t>> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    const std::string part = s.substr(i, j - i);
    const size_t dash = part.find('-');
    int64_t a = -1, b = -1;
    try {
      size_t u1 = 0, u2 = 0;
      if (dash == std::string::npos) {
        a = b = std::stoll(part, &u1);
        if (u1 != part.size()) a = -1;
      } else {
        a = std::stoll(part.substr(0, dash), &u1);
        b = std::stoll(part.substr(dash + 1), &u2);
        if (u1 != dash || u2 != part.size() - dash - 1) a = -1;
      }
    } catch (const std::logic_error&) {
      a = -1;
    }
    ZMLX_CHECK(a >= 0 && b >= a, "--layers '{}': '{}' is not a range like 0-23", s, part);
    out.push_back({a, b + 1});
    i = j + 1;
  }
  ZMLX_CHECK(int(out.size()) == n, "--layers '{}': {} ranges for {} ranks (give one range per rank)", s, out.size(), n);
  int64_t expect = 0;
  for (auto& [a, b] : out) {
    ZMLX_CHECK(a == expect, "--layers '{}': ranges must be contiguous from layer 0; expected one starting at {}, found {}",
               s, expect, a);
    expect = b;
  }
  ZMLX_CHECK(expect == n_layers, "--layers '{}': the ranges end at layer {} but the model has layers 0-{}", s,
             expect - 1, n_layers - 1);
  return out;
}

void Communicator::broadcast_i32(std::vector<int32_t>& v, int root, bool wait_forever) {
  int64_t n = int64_t(v.size());
  broadcast(&n, sizeof n, root, wait_forever);
  v.resize(size_t(n));
  if (n > 0) broadcast(v.data(), size_t(n) * sizeof(int32_t), root);
}

std::vector<std::string> Communicator::all_gather_string(const std::string& mine) {
  std::vector<std::string> all(static_cast<size_t>(size()));
  for (int r = 0; r < size(); ++r) {
    std::vector<int32_t> chars;
    if (r == rank()) chars.assign(mine.begin(), mine.end());
    broadcast_i32(chars, r);
    all[size_t(r)].assign(chars.begin(), chars.end());
  }
  return all;
}

int local_rank(int rank) {
  for (const char* k : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(k)) return std::max(0, std::atoi(v));
  return rank;
}

int launcher_size() {
  for (const char* k : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"})
    if (const char* v = std::getenv(k)) return std::max(1, std::atoi(v));
  return 1;
}

void maybe_inject_fault(int rank, int step) {
  static const char* spec = std::getenv("ZMLX_DIST_FAULT");
  if (!spec || !*spec) return;
  int r = -1, st = -1;
  char kind[16] = {0};
  if (std::sscanf(spec, "%d:%15[a-z]:%d", &r, kind, &st) != 3 || r != rank || st != step) return;
  std::fprintf(stderr, "[zmlx] rank %d: ZMLX_DIST_FAULT: %s at decode step %d\n", rank, kind, step);
  std::fflush(stderr);
  if (std::string(kind) == "kill") std::raise(SIGKILL);
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));  // hang
}

}  // namespace zmlx::dist
