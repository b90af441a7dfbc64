// The model side of multi-process runs: moving activations between pipeline
// stages and the tensor-parallel all-reduce, through dist::Communicator.
// Buffers go to the communicator where they live when it accepts that device
// (CPU ranks over MPI, GPU ranks over NCCL); otherwise (a GPU tensor and a
// host-only transport) they are staged through host memory.
#include "zmlx/core/error.h"
#include "zmlx/dist/comm.h"
#include "zmlx/models/model.h"

namespace zmlx {

namespace {
// Staging through host memory needs a transport that takes host buffers.
void check_host_transport(const dist::Placement& P) {
  ZMLX_CHECK(P.comm->accepts(Device::CPU), "--parallel: the {} transport takes device buffers only, and this "
             "rank's tensors are on another device", P.comm->kind());
}
}  // namespace

bool Model::stage_input(Backend& be, const std::vector<int32_t>& ids, const Weight& embed, Tensor& h) {
  const dist::Placement& P = placement();
  if (P.first_stage()) {
    h = be.embed(embed, ids);
    return false;
  }
  const std::vector<int64_t> shape = {int64_t(ids.size()), config_.hidden_size};
  if (P.comm->accepts(be.device())) {
    h = be.alloc(DType::BF16, shape);
    P.comm->recv(h.data, h.nbytes(), P.rank - 1);
    return true;
  }
  check_host_transport(P);
  Tensor host = host_tensor(DType::BF16, shape);
  P.comm->recv(host.data, host.nbytes(), P.rank - 1);
  h = be.from_host(host);
  return true;
}

Tensor Model::forward_layers(Backend& be, const std::vector<int32_t>& ids, Cache& cache, bool all_logits,
                             const Weight& embed, const Tensor& norm, const Weight& lm_head, size_t n_layers,
                             const BlockFn& block) {
  ZMLX_CHECK(!ids.empty(), "forward: no tokens");
  ZMLX_CHECK(cache.kv.size() == n_layers, "forward: the cache was not made by this model");
  Tensor h;
  stage_input(be, ids, embed, h);  // pipeline: later stages receive h
  const int64_t NL = int64_t(n_layers);
  Tensor f;  // the previous block's output, added to h together with the next norm
  for (size_t l = size_t(placement().layer_begin()); l < size_t(placement().layer_end(NL)); ++l) block(l, h, f);
  tp_reduce_add(be, h, f);
  cache.pos += int64_t(ids.size());
  if (stage_output(be, h)) return Tensor{};  // pipeline: not the last stage
  if (!all_logits && ids.size() > 1) h = last_row(h);
  return be.linear(be.rms_norm(h, norm, config_.rms_norm_eps), lm_head);
}

bool Model::stage_output(Backend& be, const Tensor& h) {
  const dist::Placement& P = placement();
  if (P.last_stage()) return false;
  ZMLX_CHECK(h.dtype == DType::BF16 && h.cols() == config_.hidden_size, "pipeline: unexpected activation {}",
             h.shape_str());
  if (P.comm->accepts(h.device)) {
    P.comm->send(h.data, h.nbytes(), P.rank + 1);
  } else {
    check_host_transport(P);
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
  check_host_transport(P);
  Tensor host = be.to_host(t);
  P.comm->allreduce_sum(host.data, host.numel(), host.dtype);
  t = be.from_host(host);
}

Tensor Model::tp_reduce_add_rms_norm(Backend& be, Tensor& h, Tensor& x, const Tensor& w, float eps) {
  if (x.empty()) return be.rms_norm(h, w, eps);
  const dist::Placement& P = placement();
  if (P.tensor() && P.size > 1 && x.rows() == 1 && x.dtype == DType::BF16 && h.dtype == DType::BF16 &&
      w.dtype == DType::BF16 && x.device == w.device && P.comm->accepts(x.device)) {
    Tensor out = be.alloc(DType::BF16, {1, x.cols()});
    if (P.comm->allreduce_add_rms_norm(x.data, h.data, w.data, x.cols(), eps, out.data)) return out;
  }
  tp_reduce(be, x);
  return be.add_rms_norm(h, x, w, eps);
}

void Model::tp_reduce_add(Backend& be, Tensor& h, Tensor& x) {
  if (x.empty()) return;
  tp_reduce(be, x);
  be.add(h, x);
}

}  // namespace zmlx
