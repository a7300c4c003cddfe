// Launchers of the CUDA token log-prob kernels. Plain CUDA types only, so that the .cu file needs
// no torch headers and compiles with nvcc alone (see token_logprobs_cuda.cpp for the torch glue).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace synpo {
namespace cuda {

enum class LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RowsArgs {
  const void* logits;       // (rows, vocab), unit stride along vocab
  LogitsDtype dtype;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;       // in elements
  const int64_t* labels;    // (rows,), aligned with the logits rows
  int64_t ignore_index;
  cudaStream_t stream;
};

// logp: fp32 (rows,); lse: fp32 (rows, 2), per row the max m and log sum exp(z - m). Ignored rows get
// 0; out-of-range labels get NaN (never read out of bounds).
cudaError_t launch_token_logprobs_fwd(const RowsArgs& args, float* logp, float* lse);

// lse as the forward wrote it; out (rows, vocab) with row stride out_stride, same dtype as the
// logits; may alias the logits.
cudaError_t launch_token_logprobs_bwd(const RowsArgs& args, const float* grad, const float* lse, void* out,
                                      int64_t out_stride);

}  // namespace cuda
}  // namespace synpo
