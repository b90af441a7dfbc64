#include "zmlx/core/error.h"
#include "zmlx/ops/backend.h"

namespace zmlx {

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

std::unique_ptr<Backend> make_backend_for_ranks(const std::string& name, bool distributed) {
  if (!distributed) return make_backend(name);
  // The MPI transport moves host buffers; GPU ranks (NCCL) are not implemented.
  ZMLX_CHECK(name != "cuda", "--backend cuda with --parallel: multi-process runs use CPU ranks for now (GPU ranks "
             "over NCCL are not implemented); use --backend cpu or auto");
  return make_cpu_backend();
}

}  // namespace zmlx
