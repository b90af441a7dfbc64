#include <algorithm>

#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/dist/placement.h"
#include "zmlx/ops/backend.h"

namespace zmlx {

void check_combine_scores(const Routing& r, CombineMode mode, const char* op) {
  ZMLX_CHECK(mode != CombineMode::Bf16Products || r.scores.dtype == DType::BF16,
             "{}: the bf16-product combine needs bf16 routing scores, got {} (fp32 scores go with the fp32-product "
             "combine)",
             op, dtype_name(r.scores.dtype));
}

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
#ifdef ZMLX_HAVE_CUDA
  if (name == "cuda") {
    ZMLX_CHECK(cuda_device_present(), "--backend cuda: no CUDA device is visible (driver missing or no GPU); use --backend cpu");
    return make_cuda_backend(0);
  }
  if (name == "auto") return cuda_device_present() ? make_cuda_backend(0) : make_cpu_backend();
#else
  if (name == "cuda") fail("--backend cuda: this build has no CUDA backend (nvcc was not found at build time); use --backend cpu");
  if (name == "auto") return make_cpu_backend();
#endif
  fail("unknown backend '{}' (expected cpu, cuda or auto)", name);
}

namespace {

// Whether this rank could run on a GPU under --parallel.
bool gpu_rank_possible() {
#ifdef ZMLX_HAVE_CUDA
  return dist::nccl_available() && cuda_device_present();
#else
  return false;
#endif
}

// A CUDA rank: GPU local rank % visible devices, and the NCCL communicator on
// its stream in place of the MPI one (which it keeps for control messages).
std::unique_ptr<Backend> make_gpu_rank(dist::Placement& place) {
#ifdef ZMLX_HAVE_CUDA
  ZMLX_CHECK(cuda_device_present(), "--backend cuda: rank {} ({}) sees no CUDA device; use --backend cpu", place.rank,
             place.comm->hosts().at(size_t(place.rank)));
  ZMLX_CHECK(dist::nccl_available(), "--backend cuda with --parallel: this build has no NCCL (CMake prints 'zmlx: NCCL "
             "OFF'), so GPU ranks cannot exchange activations; install NCCL and rebuild, or use --backend cpu");
  const int gpu = dist::local_rank(place.rank) % cuda_device_count();
  std::unique_ptr<Backend> be = make_cuda_backend(gpu);
  place.comm = dist::make_nccl_comm(place.comm, be->device_index(), be->native_stream());
  return be;
#else
  fail("--backend cuda: this build has no CUDA backend (nvcc was not found at build time); use --backend cpu");
#endif
}

}  // namespace

std::unique_ptr<Backend> make_backend_for_ranks(const std::string& name, dist::Placement& place) {
  if (!place.active()) return make_backend(name);
  ZMLX_CHECK(name == "cpu" || name == "cuda" || name == "auto", "unknown backend '{}' (expected cpu, cuda or auto)",
             name);
  bool gpu = name == "cuda";
  if (name == "auto") {
    // Every rank must choose alike (a GPU rank cannot exchange activations
    // with a CPU rank): GPUs only when all ranks can use one.
    const auto can = place.comm->all_gather_string(gpu_rank_possible() ? "gpu" : "cpu");
    gpu = std::all_of(can.begin(), can.end(), [](const std::string& c) { return c == "gpu"; });
  }
  std::unique_ptr<Backend> be = gpu ? make_gpu_rank(place) : make_cpu_backend();
  place.devices = place.comm->all_gather_string(be->name());
  return be;
}

}  // namespace zmlx
