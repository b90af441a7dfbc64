// See nccl_lsa_allreduce.h.
#include "zmlx/dist/nccl_lsa_allreduce.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <stdexcept>
#include <string>

#include "zmlx/backend/cuda/device_common.cuh"

namespace zmlx::dist {
namespace {

using namespace zmlx::cuda::dev;

constexpr int kThreads = 256;

// Rank r's slot of the current barrier epoch holds its partial; after the
// barrier, vector i summed over the ranks in rank order (fp32, one rounding).
__device__ __forceinline__ uint4 rank_sum(ncclWindow_t win, size_t off, int ranks, int i) {
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
  return make_uint4(pack_bf2(acc[0], acc[1]), pack_bf2(acc[2], acc[3]), pack_bf2(acc[4], acc[5]),
                    pack_bf2(acc[6], acc[7]));
}

// One block: count is a multiple of 8 (16-byte vectors), at most half / 2.
__global__ void __launch_bounds__(kThreads) lsa_allreduce_kernel(ncclDevComm dc, ncclWindow_t win, size_t half,
                                                                 uint16_t* buf, int count) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();  // buf is the previous kernel's output
  ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), dc, ncclTeamTagLsa(), 0);
  const size_t off = (bar.epoch & 1u) ? half : 0;
  uint4* mine = reinterpret_cast<uint4*>(ncclGetLocalPointer(win, off));
  uint4* v = reinterpret_cast<uint4*>(buf);
  const int nvec = count / 8;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) mine[i] = v[i];
  // Release our slot's stores, acquire the peers'.
  bar.sync(ncclCoopCta(), ::cuda::memory_order_acq_rel);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) v[i] = rank_sum(win, off, dc.lsaSize, i);
}

// One row of D = 8·blockDim.x values: x = Σ ranks x; h = bf16(h + x);
// out = rms_norm(h)·w through add_rms_norm_row8, the function the backend's
// add_rms_norm runs for such rows, so the result has its bits.
__global__ void lsa_allreduce_add_rms_norm_kernel(ncclDevComm dc, ncclWindow_t win, size_t half, uint16_t* x,
                                                  uint16_t* h, const uint16_t* w, float eps, uint16_t* out) {
  ZMLX_TRACE_BLOCK_END();
  pdl_begin();  // x is the previous kernel's output
  ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), dc, ncclTeamTagLsa(), 0);
  const size_t off = (bar.epoch & 1u) ? half : 0;
  const int i = threadIdx.x, D = 8 * blockDim.x;
  reinterpret_cast<uint4*>(ncclGetLocalPointer(win, off))[i] = reinterpret_cast<const uint4*>(x)[i];
  const uint4 wv = reinterpret_cast<const uint4*>(w)[i];
  const uint4 hv = reinterpret_cast<const uint4*>(h)[i];
  bar.sync(ncclCoopCta(), ::cuda::memory_order_acq_rel);
  const uint4 xv = rank_sum(win, off, dc.lsaSize, i);
  reinterpret_cast<uint4*>(x)[i] = xv;
  uint4 hn, on;
  add_rms_norm_row8(hv, xv, wv, D, eps, hn, on);
  reinterpret_cast<uint4*>(h)[i] = hn;
  reinterpret_cast<uint4*>(out)[i] = on;
}

}  // namespace

struct LsaAllReduce::Impl {
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

bool LsaAllReduce::fits(int64_t count, const void* buf) const {
  return count > 0 && count % 8 == 0 && size_t(count) * 2 <= impl_->half && reinterpret_cast<uintptr_t>(buf) % 16 == 0;
}

namespace {
void check(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + " launch: " + cudaGetErrorString(e));
}
}  // namespace

void LsaAllReduce::run(uint16_t* buf, int64_t count, cudaStream_t s) {
  launch(lsa_allreduce_kernel, dim3(1), dim3(kThreads), s, impl_->dc, impl_->win, impl_->half, buf, int(count));
  check("device all-reduce");
}

bool LsaAllReduce::fits_add_rms_norm(int64_t D, const void* x, const void* h, const void* w, const void* out) const {
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(h) |
                         reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(out)) & 15) == 0;
  return aligned && D % 256 == 0 && D / 8 <= 1024 && fits(D, x);
}

void LsaAllReduce::run_add_rms_norm(uint16_t* x, uint16_t* h, const uint16_t* w, int64_t D, float eps, uint16_t* out,
                                    cudaStream_t s) {
  launch(lsa_allreduce_add_rms_norm_kernel, dim3(1), dim3(unsigned(D / 8)), s, impl_->dc, impl_->win, impl_->half, x, h,
         w, eps, out);
  check("device all-reduce + add + RMSNorm");
}

}  // namespace zmlx::dist
