// Torch glue of the CUDA token log-prob kernels: argument checks, allocation, stream, dispatch key.
// Compiled only in CUDA builds (setup.py / CMakeLists.txt).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "token_logprobs.h"
#include "token_logprobs_kernels.h"

namespace synpo {
namespace {

cuda::LogitsDtype dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::LogitsDtype::kFloat32;
    case at::kBFloat16:
      return cuda::LogitsDtype::kBFloat16;
    case at::kHalf:
      return cuda::LogitsDtype::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "logits: unsupported dtype ", t, " for the CUDA kernel");
  }
}

cuda::RowsArgs rows_args(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  return {logits.data_ptr(),      dtype_code(logits.scalar_type()), logits.size(0), logits.size(1),
          logits.stride(0),       labels.data_ptr<int64_t>(),       ignore_index,
          at::cuda::getCurrentCUDAStream(logits.device().index()).stream()};
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// float64 logits (gradchecks) go through ATen in double: exact, and not a hot path. lse: (rows, 2),
// (max, log sum exp(z - max)) per row as the kernels write it; a row with NaN or +inf gets NaN.
std::tuple<at::Tensor, at::Tensor> fwd_double(const at::Tensor& logits, const at::Tensor& labels,
                                              int64_t ignore_index) {
  const at::Tensor valid = labels != ignore_index;
  const at::Tensor safe = at::where(valid, labels, at::zeros_like(labels));
  const at::Tensor max = at::amax(logits, {1}, /*keepdim=*/true);
  const at::Tensor zero = at::zeros({}, max.options());
  const at::Tensor shift = at::where(max == -std::numeric_limits<double>::infinity(), zero, max);
  const at::Tensor log_sum = at::log(at::exp(logits - shift).sum(1, /*keepdim=*/true));
  const at::Tensor target = logits.gather(1, safe.unsqueeze(1));
  const at::Tensor logp = ((target - max) - log_sum).squeeze(1);
  return {at::where(valid, logp, zero), at::where(valid.unsqueeze(1), at::cat({max, log_sum}, 1), zero)};
}

at::Tensor bwd_double(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& lse, int64_t ignore_index) {
  const at::Tensor valid = labels != ignore_index;
  const at::Tensor g = at::where(valid, grad, at::zeros({}, grad.options()));
  const at::Tensor max = lse.select(1, 0).unsqueeze(1);
  const at::Tensor log_sum = lse.select(1, 1).unsqueeze(1);
  at::Tensor out = -(g.unsqueeze(1) * at::exp((logits - max) - log_sum));
  out.scatter_add_(1, at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1), g.unsqueeze(1));
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.scalar_type() == at::kDouble) return fwd_double(logits, labels, ignore_index);
  at::Tensor logp = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({logits.size(0), 2}, logits.options().dtype(at::kFloat));
  check_launch(cuda::launch_token_logprobs_fwd(rows_args(logits, labels, ignore_index), logp.data_ptr<float>(),
                                               lse.data_ptr<float>()),
               "token_logprobs_fwd");
  return {logp, lse};
}

void bwd_into(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
              int64_t ignore_index, at::Tensor& out) {
  check_launch(cuda::launch_token_logprobs_bwd(rows_args(logits, labels, ignore_index), grad.data_ptr<float>(),
                                               lse.data_ptr<float>(), out.data_ptr(), out.stride(0)),
               "token_logprobs_bwd");
}

at::Tensor token_logprobs_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels);
  check_token_logprobs_bwd_inputs(grad, logits, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.scalar_type() == at::kDouble) return bwd_double(grad, logits, labels, lse, ignore_index);
  at::Tensor out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  bwd_into(grad, logits, labels, lse, ignore_index, out);
  return out;
}

void token_logprobs_bwd_inplace_cuda(at::Tensor& logits, const at::Tensor& grad, const at::Tensor& labels,
                                     const at::Tensor& lse, int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels);
  check_token_logprobs_bwd_inputs(grad, logits, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (logits.scalar_type() == at::kDouble) {
    logits.copy_(bwd_double(grad, logits, labels, lse, ignore_index));
    return;
  }
  bwd_into(grad, logits, labels, lse, ignore_index, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(synpo_kernels, CUDA, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cuda);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cuda);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_inplace_cuda);
}

}  // namespace synpo
