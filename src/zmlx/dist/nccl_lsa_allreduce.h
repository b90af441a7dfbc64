// The small bf16 all-reduce of tensor-parallel decode as one kernel of ours,
// built on NCCL's device API (NCCL >= 2.28): a symmetric window from
// ncclMemAlloc, registered with NCCL_WIN_COLL_SYMMETRIC, and an LSA barrier
// from ncclDevCommCreate. Each rank copies its partial into its own window
// slot, meets the others at the barrier, reads every rank's slot through
// NCCL's load/store-accessible (NVLink) pointers and sums them in rank order
// in fp32, rounding once to bf16 — so every rank gets the same bits, and with
// two ranks the same bits as ncclAllReduce.
//
// Why: at batch 1 an ncclAllReduce node of a CUDA graph costs ~6 µs and
// breaks the programmatic-launch chain around it; this kernel is launched
// with programmatic dependent launch like every backend kernel.
//
// Slots alternate with the barrier's epoch (the number of barriers this
// rank has passed, equal on every rank), so a rank never overwrites the slot
// a slower peer may still be reading: before writing slot e % 2 at epoch e
// it has passed barrier e - 1, which every peer reaches only after reading
// slot (e - 2) % 2. This holds across graph replays and eager calls alike.
//
// The device API's structs are compiled into the kernel from the headers:
// the library loaded at run time must be the exact NCCL version of those
// headers (nccl_comm.cpp checks ncclGetVersion and otherwise keeps
// ncclAllReduce).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

typedef struct CUstream_st* cudaStream_t;
typedef struct ncclComm* ncclComm_t;

namespace zmlx::dist {

class LsaAllReduce {
 public:
  // Entry points resolved from libnccl at run time (nccl_comm.cpp loads it).
  struct Api {
    void* MemAlloc;            // ncclMemAlloc
    void* CommWindowRegister;  // ncclCommWindowRegister
    void* DevCommCreate;       // ncclDevCommCreate
  };

  // Collective: every rank of comm calls it with the same max_bytes.
  // settle(what) waits for a nonblocking NCCL call to finish (or throws).
  // Throws std::runtime_error when NCCL refuses (no NVLink peers, ...).
  static std::unique_ptr<LsaAllReduce> create(ncclComm_t comm, const Api& api, size_t max_bytes,
                                              const std::function<void(int, const char*)>& settle);
  ~LsaAllReduce();

  // Whether run() takes `count` bf16 values at buf (16-byte vectors).
  bool fits(int64_t count, const void* buf) const;
  // buf[count] (bf16, device) = Σ over ranks, in place, on stream s.
  void run(uint16_t* buf, int64_t count, cudaStream_t s);
  // One row of D bf16 values: x = Σ over ranks, h = bf16(h + x), out =
  // rms_norm(h)·w, in one kernel, with the bits of the CUDA backend's
  // add_rms_norm after the all-reduce. Where fits_add_rms_norm says so
  // (D a multiple of 256, at most 8192; 16-byte aligned buffers).
  bool fits_add_rms_norm(int64_t D, const void* x, const void* h, const void* w, const void* out) const;
  void run_add_rms_norm(uint16_t* x, uint16_t* h, const uint16_t* w, int64_t D, float eps, uint16_t* out,
                        cudaStream_t s);

  struct Impl;

 private:
  explicit LsaAllReduce(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace zmlx::dist
