// Shared declarations and input checks of the token log-prob ops (CPU and CUDA glue).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace synpo {

inline at::ScalarType accumulation_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The Python wrapper validates user input with clear messages; these checks keep direct callers of
// torch.ops.synpo_kernels.* from reaching an out-of-bounds access.
inline void check_token_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D (rows, vocab) tensor, got ", logits.dim(), "-D");
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits: the vocabulary dimension is empty");
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) == 1, "logits: the vocabulary dimension must have unit stride");
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1),
                    "logits: rows must not overlap (row stride ", logits.stride(0), " < vocab ", logits.size(1), ")");
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   "logits: expected float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels: expected int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels: expected shape (",
                    logits.size(0), ",), got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.is_contiguous(), "labels: must be contiguous");
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "labels: on ", labels.device(), " but logits on ",
                    logits.device());
}

// lse: (rows, 2), per row the max m and log sum exp(z - m), as token_logprobs_fwd returns it.
inline void check_token_logprobs_bwd_inputs(const at::Tensor& grad_logp, const at::Tensor& logits,
                                            const at::Tensor& lse) {
  const auto acc = accumulation_dtype(logits.scalar_type());
  TORCH_CHECK_VALUE(grad_logp.dim() == 1 && grad_logp.size(0) == logits.size(0), "grad_logp: expected shape (",
                    logits.size(0), ",), got ", grad_logp.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == logits.size(0) && lse.size(1) == 2, "lse: expected shape (",
                    logits.size(0), ", 2), got ", lse.sizes());
  for (const auto* t : {&grad_logp, &lse}) {
    const char* name = t == &grad_logp ? "grad_logp" : "lse";
    TORCH_CHECK_TYPE(t->scalar_type() == acc, name, ": expected ", acc, ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->is_contiguous(), name, ": must be contiguous");
    TORCH_CHECK_VALUE(t->device() == logits.device(), name, ": on ", t->device(), " but logits on ",
                      logits.device());
  }
}

}  // namespace synpo
