// Op schemas of torch.ops.synpo_kernels.* and the Python module synpo_kernels._C.
//
// Kernels register per device in their own files (TORCH_LIBRARY_IMPL ... CPU / CUDA); fake kernels
// and autograd are registered from Python (synpo_kernels/ops/token_logprobs.py).

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(synpo_kernels, m) {
  m.def("token_logprobs_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index) "
      "-> Tensor");
  m.def(
      "token_logprobs_bwd_(Tensor(a!) logits, Tensor grad_logp, Tensor labels, Tensor lse, int ignore_index) "
      "-> ()");
}

namespace {

bool built_with_cuda() {
#ifdef SYNPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "synpo_kernels compiled kernels; the ops are torch.ops.synpo_kernels.*";
  m.def("built_with_cuda", &built_with_cuda, "Whether this build includes the CUDA kernels");
}
