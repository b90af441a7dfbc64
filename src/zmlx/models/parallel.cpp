// The model side of multi-process runs: moving activations between pipeline
// stages and the tensor-parallel all-reduce, through dist::Communicator.
// Tensors on a device the communicator cannot take are staged through host
// memory (the CPU backend's tensors are host memory already).
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/models/model.h"

namespace zmlx {

bool Model::stage_input(Backend& be, const std::vector<int32_t>& ids, const Weight& embed, Tensor& h) {
  const dist::Placement& P = placement();
  if (P.first_stage()) {
    h = be.embed(embed, ids);
    return false;
  }
  Tensor host = host_tensor(DType::BF16, {int64_t(ids.size()), config_.hidden_size});
  P.comm->recv(host.data, host.nbytes(), P.rank - 1);
  h = be.from_host(host);
  return true;
}

bool Model::stage_output(Backend& be, const Tensor& h) {
  const dist::Placement& P = placement();
  if (P.last_stage()) return false;
  ZMLX_CHECK(h.dtype == DType::BF16 && h.cols() == config_.hidden_size, "pipeline: unexpected activation {}",
             h.shape_str());
  if (P.comm->accepts(h.device)) {
    P.comm->send(h.data, h.nbytes(), P.rank + 1);
  } else {
    Tensor host = be.to_host(h);
    P.comm->send(host.data, host.nbytes(), P.rank + 1);
  }
  return true;
}

void Model::tp_reduce(Backend& be, Tensor& t) {
  const dist::Placement& P = placement();
  if (!P.tensor() || P.size == 1) return;
  if (P.comm->accepts(t.device)) {
    P.comm->allreduce_sum(t.data, t.numel(), t.dtype);
    return;
  }
  Tensor host = be.to_host(t);
  P.comm->allreduce_sum(host.data, host.numel(), host.dtype);
  t = be.from_host(host);
}

}  // namespace zmlx
