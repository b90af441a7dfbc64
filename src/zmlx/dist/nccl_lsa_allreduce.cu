// See nccl_lsa_allreduce.h.
#include "zmlx/dist/nccl_lsa_allreduce.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <stdexcept>
#include <string>

namespace zmlx::dist {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float lo_bf(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t pack_bf2(float lo, float hi) {
  const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo)), h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  return l | (h << 16);
}

// One block: count is a multiple of 8 (16-byte vectors), at most half / 2.
__global__ void __launch_bounds__(kThreads) lsa_allreduce_kernel(ncclDevComm dc, ncclWindow_t win, size_t half,
                                                                 uint16_t* buf, int count) {
#if __CUDA_ARCH__ >= 900
  // Programmatic dependent launch: buf is the previous kernel's output.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), dc, ncclTeamTagLsa(), 0);
  const size_t off = (bar.epoch & 1u) ? half : 0;
  uint4* mine = reinterpret_cast<uint4*>(ncclGetLocalPointer(win, off));
  const uint4* src = reinterpret_cast<const uint4*>(buf);
  const int nvec = count / 8;
  for (int i = threadIdx.x; i < nvec; i += kThreads) mine[i] = src[i];
  // Release our slot's stores, acquire the peers'.
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);
  const int ranks = dc.lsaSize;
  uint4* dst = reinterpret_cast<uint4*>(buf);
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < ranks; ++r) {
      const uint4 v = reinterpret_cast<const uint4*>(ncclGetLsaPointer(win, off, r))[i];
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[2 * j] += lo_bf(w[j]);
        acc[2 * j + 1] += hi_bf(w[j]);
      }
    }
    dst[i] = make_uint4(pack_bf2(acc[0], acc[1]), pack_bf2(acc[2], acc[3]), pack_bf2(acc[4], acc[5]),
                        pack_bf2(acc[6], acc[7]));
  }
}

}  // namespace

struct LsaAllReduce::Impl {
  Api api{};
  void* mem = nullptr;
  size_t half = 0;  // bytes of one slot
  ncclWindow_t win = nullptr;
  ncclDevComm dc{};
};

LsaAllReduce::LsaAllReduce(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

// The window and the device communicator stay until the process ends, as the
// communicator they belong to does (nccl_comm.cpp never destroys it: a peer
// may no longer take part in a collective teardown).
LsaAllReduce::~LsaAllReduce() = default;

std::unique_ptr<LsaAllReduce> LsaAllReduce::create(ncclComm_t comm, const Api& api, size_t max_bytes,
                                                   const std::function<void(int, const char*)>& settle) {
  auto impl = std::make_unique<Impl>();
  impl->api = api;
  impl->half = (max_bytes + 255) / 256 * 256;
  auto mem_alloc = reinterpret_cast<decltype(&ncclMemAlloc)>(api.MemAlloc);
  auto win_register = reinterpret_cast<decltype(&ncclCommWindowRegister)>(api.CommWindowRegister);
  auto devcomm_create = reinterpret_cast<decltype(&ncclDevCommCreate)>(api.DevCommCreate);
  settle(int(mem_alloc(&impl->mem, 2 * impl->half)), "ncclMemAlloc");
  cudaMemset(impl->mem, 0, 2 * impl->half);
  settle(int(win_register(comm, impl->mem, 2 * impl->half, &impl->win, NCCL_WIN_COLL_SYMMETRIC)),
         "ncclCommWindowRegister");
  ncclDevCommRequirements reqs{};
  reqs.lsaBarrierCount = 1;
  settle(int(devcomm_create(comm, &reqs, &impl->dc)), "ncclDevCommCreate");
  if (impl->dc.lsaSize != impl->dc.nRanks)
    throw std::runtime_error("the ranks do not all share one NVLink domain (" + std::to_string(impl->dc.lsaSize) +
                             " of " + std::to_string(impl->dc.nRanks) + ")");
  return std::unique_ptr<LsaAllReduce>(new LsaAllReduce(std::move(impl)));
}

bool LsaAllReduce::fits(int64_t count) const {
  return count > 0 && count % 8 == 0 && size_t(count) * 2 <= impl_->half;
}

void LsaAllReduce::run(uint16_t* buf, int64_t count, cudaStream_t s) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(1);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e =
      cudaLaunchKernelEx(&cfg, lsa_allreduce_kernel, impl_->dc, impl_->win, impl_->half, buf, int(count));
  if (e != cudaSuccess) throw std::runtime_error(std::string("device all-reduce launch: ") + cudaGetErrorString(e));
}

}  // namespace zmlx::dist
