// Communicator: the collective and point-to-point operations the parallel
// model code needs, independent of the transport. MPI implements it for CPU
// ranks (one or several hosts); NCCL for GPU ranks, where activation buffers
// live on the device (see accepts()) and control messages still go over MPI.
//
// Every operation has a deadline (timeout_seconds()): a peer that died or
// hangs makes the waiting rank throw dist::PeerError naming that rank, instead
// of blocking forever. wait_forever variants exist only for a follower idling
// between requests.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "zmlx/core/dtype.h"
#include "zmlx/core/error.h"
#include "zmlx/ops/tensor.h"

namespace zmlx::dist {

// A peer did not answer within the deadline (or the transport failed).
class PeerError : public Error {
 public:
  using Error::Error;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string kind() const = 0;  // "mpi", "nccl", ...
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Host name of every rank (index = rank), gathered at start.
  virtual const std::vector<std::string>& hosts() const = 0;
  // Whether the buffers of allreduce_sum / send / recv may live on `d` (MPI:
  // CPU only; NCCL: CUDA only). broadcast and barrier always take host memory:
  // they carry control messages (tokens, requests, stop flags).
  virtual bool accepts(Device d) const { return d == Device::CPU; }

  // In place: buf = Σ over ranks, for BF16 or F32 buffers; every rank gets
  // bit-identical results. MPI and NCCL's device-API kernel (decode rows)
  // sum in fp32 in rank order (0, 1, ...) and round once; ncclAllReduce
  // (larger buffers, or where the device API is off) does too for two
  // ranks, while with more its ring rounds each partial sum.
  virtual void allreduce_sum(void* buf, int64_t count, DType dtype) = 0;
  // The end of a tensor-parallel block as one operation, where the transport
  // offers it: for one row of D bf16 values (device buffers), x = Σ over
  // ranks (as allreduce_sum), h = bf16(h + x), out = rms_norm(h)·w (eps) —
  // the same bits as allreduce_sum followed by the backend's add_rms_norm.
  // Returns false, having done nothing, where it is not offered.
  virtual bool allreduce_add_rms_norm(void* x, void* h, const void* w, int64_t D, float eps, void* out) {
    (void)x, (void)h, (void)w, (void)D, (void)eps, (void)out;
    return false;
  }
  virtual void send(const void* buf, size_t bytes, int dst) = 0;
  virtual void recv(void* buf, size_t bytes, int src) = 0;
  // root's buf -> every rank's buf.
  virtual void broadcast(void* buf, size_t bytes, int root, bool wait_forever = false) = 0;
  // Every rank reaches this point (deadline scaled by `patience`).
  virtual void barrier(double patience = 1.0) = 0;
  // Ends the whole job after a failure (MPI_Abort); never returns.
  [[noreturn]] virtual void abort(int code) = 0;

  // Device transports (NCCL) may be used while the backend records a CUDA
  // graph: the recorded operations then run on each replay, where no
  // per-operation deadline sees them. After launching such a recording, the
  // caller hands the work now queued on the transport's stream to the
  // deadline as one operation, described by `what` (the peers are appended).
  // No-op for host transports, whose operations never run inside a recording.
  virtual void watch_device_work(const std::string& what) { (void)what; }

  double timeout_seconds() const { return timeout_s_; }
  void set_timeout_seconds(double s) { timeout_s_ = s; }

  // Typed helpers (over broadcast, so host memory).
  void broadcast_i32(std::vector<int32_t>& v, int root, bool wait_forever = false);
  // Every rank's `mine`, index = rank (e.g. each rank's device name).
  std::vector<std::string> all_gather_string(const std::string& mine);

 protected:
  double timeout_s_ = 60;
};

// Whether this build has MPI (multi-process runs at all).
bool mpi_available();
// The process-wide communicator of an `mpirun` launch, created on first use
// (MPI_Init). Throws with a clear message when MPI is not in this build.
std::shared_ptr<Communicator> world(double timeout_seconds);
// Whether world() was created (so main() must finalize it).
bool world_started();
// Ends the MPI session: MPI_Finalize when ok, MPI_Abort otherwise (so the
// other ranks do not wait for this one). No-op without a world.
void finalize(bool ok);
// GPU ranks (dist/nccl_comm.cpp): whether this build has NCCL.
bool nccl_available();
// A communicator for GPU ranks: allreduce_sum / send / recv take buffers on
// CUDA device `device` and run through NCCL on `stream` (a cudaStream_t, the
// backend's, so transfers are ordered with its kernels); broadcast, barrier
// and abort go to `control` (MPI, host memory). The NCCL unique id is sent
// from rank 0 over `control`. Collective: every rank calls it. Throws when
// this build has no NCCL.
std::shared_ptr<Communicator> make_nccl_comm(std::shared_ptr<Communicator> control, int device, void* stream);
// This process's index among the ranks on its host, from the launcher's
// environment (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID);
// `rank` when none is set. A GPU rank uses GPU local_rank % device count.
int local_rank(int rank);

// Ranks announced by the launcher's environment (OMPI_COMM_WORLD_SIZE, ...),
// 1 when not launched by mpirun. Does not initialise MPI.
int launcher_size();

// Test hook (ZMLX_DIST_FAULT="RANK:kill|hang:STEP"): on rank RANK, at decode
// step STEP, SIGKILL itself or stop answering. No-op when unset.
void maybe_inject_fault(int rank, int step);

}  // namespace zmlx::dist
