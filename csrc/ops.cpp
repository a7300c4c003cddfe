// The Python module synpo_kernels._C.
//
// The op schemas of torch.ops.synpo_kernels.* are defined once, in Python
// (synpo_kernels/ops/schemas.py, run before this module is loaded). The C++ sources only register
// kernels for them, per device, in their own files (TORCH_LIBRARY_IMPL ... CPU in
// token_logprobs_cpu.cpp, CUDA in token_logprobs_cuda.cpp); fake kernels and autograd are
// registered from Python (synpo_kernels/ops/token_logprobs.py).

#include <torch/extension.h>

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
