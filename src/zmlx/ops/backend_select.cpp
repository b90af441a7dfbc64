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

}  // namespace zmlx
