// CUDA kernels of the fused per-token log-softmax gather.
//
// Only CUDA headers here (no torch): the torch glue lives in token_logprobs_cuda.cpp, so this file
// compiles with plain nvcc, and CPU-only CI compiles it as a check. Naming rule (csrc/README.md):
// device code `<op>_kernels.cu`, torch glue `<op>_cuda.cpp`; every source stem is unique, because
// torch's build names object files by stem.
//
// Memory-bound design: one thread block per row. Forward reads the row once with 16-byte vector
// loads (a scalar prologue up to the row's first 16-byte boundary, so any vocabulary and row stride
// vectorizes; two independent loads in flight per thread), keeping a per-thread online (max, sum of
// exp) in fp32, as s = 1 + rest with the max's own 1 left out (see MaxSum), rescaled only when the
// max grows, then reduces across the block once;
// rows whose label is ignore_index exit before reading anything. It writes (m, log s) per row
// (`lse`, (rows, 2)) and logp = (z[label] - m) - log s. Backward reads the row once and writes
// grad = g * (onehot - exp((z - m) - log s)) with 16-byte stores, in the logits' dtype. Every
// exponent is formed as (z - m) first, exact near the max: exp(z - lse) with lse = m + log s rounded
// (or z * log2 e - m * log2 e) would put an error of |m|'s rounding on p, i.e. on 1 - p of a confident
// token (~10x plain fp32 PyTorch's error at |m| ~ 30). Bytes moved for forward + backward:
// read 2 x N x V, write 1 x N x V (the floor for an out-of-place gradient).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "token_logprobs_kernels.h"

namespace synpo {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int kElems = 4;  // 16 bytes
};
template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kElems = 8;
};
template <>
struct VecTraits<__half> {
  static constexpr int kElems = 8;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// exp2 with the hardware approximation (2 ulp); callers pass (x - max) * log2(e) <= 0.
__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

// exp(x - max) for x <= max, the difference taken before the scaling (exact near the max).
__device__ __forceinline__ float exp_below(float x, float max) { return fast_exp2((x - max) * kLog2e); }

// A running (max, s = sum exp(x - max)) kept as s = 1 + rest: the max's own term 1 stays out of the
// float sum, so that rest (~ 1 - p of a confident target) keeps its relative precision; a term
// below half an ulp of 1 (exp(-17) ~ 4e-8) added to a sum holding the 1 would vanish, and a row's
// few thousand of them would put ~10x plain fp32 PyTorch's error on 1 - p (seen on an H100).
// Before any finite logit (max == -inf), rest holds 0, or NaN to propagate.
struct MaxSum {
  float max;   // running max of the logits
  float rest;  // sum exp(x - max) - 1 (the max's term left out)
};

// The contribution of a partial (max, 1 + rest) to a sum taken relative to m >= its max.
__device__ __forceinline__ float scaled_sum(MaxSum a, float m) {
  return a.max == -INFINITY ? a.rest : (1.0f + a.rest) * exp_below(a.max, m);
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  if (a.max < b.max) {
    const MaxSum t = a;
    a = b;
    b = t;
  }
  if (a.max == -INFINITY) return {a.max, a.rest + b.rest};  // nothing finite yet
  // a holds the max: its 1 stays implicit; b's terms (with its own 1, a tie gives exactly 1) join rest.
  return {a.max, a.rest + scaled_sum(b, a.max)};
}

__device__ __forceinline__ MaxSum block_reduce(MaxSum v) {
  __shared__ float s_max[kThreads / 32];
  __shared__ float s_rest[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.rest, offset)};
    v = combine(v, other);
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    s_max[warp] = v.max;
    s_rest[warp] = v.rest;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / 32;
    v = lane < n_warps ? MaxSum{s_max[lane], s_rest[lane]} : MaxSum{-INFINITY, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.rest, offset)};
      v = combine(v, other);
    }
  }
  return v;  // valid in thread 0
}

// Adds one logit to a thread's running (max, rest). -inf logits (masked vocabulary) contribute 0;
// NaN makes the sum NaN, as in torch.log_softmax (+inf: see the forward kernel's end).
__device__ __forceinline__ void accumulate(MaxSum& acc, float x) {
  if (x > acc.max) {
    acc.rest = scaled_sum(acc, x);  // the old max's 1 joins rest; x's own 1 stays implicit
    acc.max = x;
  } else if (x != -INFINITY) {
    acc.rest += exp_below(x, acc.max);
  }
}

// Adds one 16-byte vector of logits. The running sum is rescaled only when the vector raises the
// max (rare once the first vectors are in), so a vector costs kElems exponentials, not kElems + 1.
template <typename T>
__device__ __forceinline__ void accumulate_vector(MaxSum& acc, const uint4& raw) {
  constexpr int kElems = VecTraits<T>::kElems;
  const T* elems = reinterpret_cast<const T*>(&raw);
  float x[kElems];
  float vmax = -INFINITY;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    x[k] = to_float(elems[k]);
    vmax = fmaxf(vmax, x[k]);  // fmaxf skips NaN; the NaN then reaches the sum below
  }
  if (vmax > acc.max) {
    // A new max (rare once the first vectors are in): the old partial joins rest, scaled; the
    // vector's terms below vmax are summed apart from its ties with vmax, each exactly 1, of which
    // one is the new max's implicit 1.
    float below = 0.0f;
    float ties = 0.0f;
#pragma unroll
    for (int k = 0; k < kElems; ++k) {
      const bool at_max = x[k] == vmax;
      below += at_max ? 0.0f : exp_below(x[k], vmax);
      ties += at_max ? 1.0f : 0.0f;
    }
    acc.rest = scaled_sum(acc, vmax) + below + (ties - 1.0f);
    acc.max = vmax;
    return;
  }
  if (acc.max == -INFINITY) {  // all -inf so far: contributes nothing (a NaN lane still poisons)
#pragma unroll
    for (int k = 0; k < kElems; ++k) acc.rest += x[k] != x[k] ? x[k] : 0.0f;
    return;
  }
#pragma unroll
  for (int k = 0; k < kElems; ++k) acc.rest += exp_below(x[k], acc.max);
}

// Elements before the first 16-byte boundary of a row: rows of any stride (V = 32001, say) get a
// short scalar prologue, then 16-byte vectors.
template <typename T>
__device__ __forceinline__ int64_t misaligned_head(const T* row, int64_t vocab) {
  const int64_t bytes = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16);
  return bytes / static_cast<int64_t>(sizeof(T)) < vocab ? bytes / static_cast<int64_t>(sizeof(T)) : vocab;
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t vocab,
                              int64_t row_stride, int64_t ignore_index, float* __restrict__ logp,
                              float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  if (label == ignore_index || label < 0 || label >= vocab) {
    if (threadIdx.x == 0) {
      const float value = label == ignore_index ? 0.0f : NAN;  // out-of-range: NaN, never an OOB read
      logp[row] = value;
      lse[2 * row] = value;
      lse[2 * row + 1] = value;
    }
    return;
  }
  const T* z = logits + row * row_stride;
  MaxSum acc{-INFINITY, 0.0f};
  int64_t tail_start = 0;
  if constexpr (kVectorized) {
    constexpr int kElems = VecTraits<T>::kElems;
    const int64_t head = misaligned_head(z, vocab);
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) accumulate(acc, to_float(z[j]));
    const int64_t n_vec = (vocab - head) / kElems;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
    // Two independent 16-byte loads in flight per thread per iteration.
    int64_t i = threadIdx.x;
    for (; i + blockDim.x < n_vec; i += 2 * static_cast<int64_t>(blockDim.x)) {
      const uint4 first = __ldg(zv + i);
      const uint4 second = __ldg(zv + i + blockDim.x);
      accumulate_vector<T>(acc, first);
      accumulate_vector<T>(acc, second);
    }
    if (i < n_vec) accumulate_vector<T>(acc, __ldg(zv + i));
    tail_start = head + n_vec * kElems;
  }
  for (int64_t j = tail_start + threadIdx.x; j < vocab; j += blockDim.x) {
    accumulate(acc, to_float(z[j]));
  }
  const MaxSum total = block_reduce(acc);
  if (threadIdx.x == 0) {
    // log1pf(rest): log s of a confident row is ~1 - p, tiny, and must keep its relative
    // precision; under --use_fast_math logf becomes __logf (absolute error ~1e-7, the size of
    // 1 - p itself), log1pf stays accurate. A +inf logit gives NaN (as log_softmax: inf - inf),
    // not a finite sum of exp(-inf) terms; an all -inf row has s = rest = 0: log1pf(-1) = -inf
    // (its logp is NaN), and a NaN rest stays NaN.
    const float log_sum = total.max == INFINITY    ? NAN
                          : total.max == -INFINITY ? log1pf(total.rest - 1.0f)
                                                   : log1pf(total.rest);
    lse[2 * row] = total.max;
    lse[2 * row + 1] = log_sum;
    logp[row] = (to_float(z[label]) - total.max) - log_sum;
  }
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(const float* __restrict__ grad, const T* logits, const int64_t* __restrict__ labels,
                              const float* __restrict__ lse, int64_t vocab, int64_t row_stride,
                              int64_t ignore_index, T* out, int64_t out_stride) {
  // `logits` and `out` may alias (in-place variant): each element is read, then written, by the
  // same thread, so no __restrict__ on them.
  const int64_t row = blockIdx.x;
  const int64_t label = labels[row];
  const bool ignored = label == ignore_index;
  const bool bad = !ignored && (label < 0 || label >= vocab);
  const float g = ignored ? 0.0f : (bad ? NAN : grad[row]);
  const float max = lse[2 * row];
  const float log_sum2 = lse[2 * row + 1] * kLog2e;
  const T* z = logits + row * row_stride;
  T* o = out + row * out_stride;
  const bool zero_row = g == 0.0f;  // ignored rows and zero gradients: exact zeros, nothing read
  int64_t tail_start = 0;
  if constexpr (kVectorized) {
    // The launcher guarantees `out` rows share the logits rows' offset to a 16-byte boundary.
    constexpr int kElems = VecTraits<T>::kElems;
    const int64_t head = misaligned_head(z, vocab);
    for (int64_t j = threadIdx.x; j < head; j += blockDim.x) {
      const float p = zero_row ? 0.0f : fast_exp2(fmaf(to_float(z[j]) - max, kLog2e, -log_sum2));
      o[j] = from_float<T>(zero_row ? 0.0f : (j == label ? g - g * p : -g * p));
    }
    const int64_t n_vec = (vocab - head) / kElems;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
    uint4* ov = reinterpret_cast<uint4*>(o + head);
    for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
      uint4 result;
      T* res = reinterpret_cast<T*>(&result);
      if (zero_row) {
#pragma unroll
        for (int k = 0; k < kElems; ++k) res[k] = from_float<T>(0.0f);
      } else {
        const uint4 raw = zv[i];
        const T* elems = reinterpret_cast<const T*>(&raw);
        const int64_t base = head + i * kElems;
#pragma unroll
        for (int k = 0; k < kElems; ++k) {
          const float p = fast_exp2(fmaf(to_float(elems[k]) - max, kLog2e, -log_sum2));
          res[k] = from_float<T>(base + k == label ? g - g * p : -g * p);
        }
      }
      ov[i] = result;
    }
    tail_start = head + n_vec * kElems;
  }
  for (int64_t j = tail_start + threadIdx.x; j < vocab; j += blockDim.x) {
    if (zero_row) {
      o[j] = from_float<T>(0.0f);
    } else {
      const float p = fast_exp2(fmaf(to_float(z[j]) - max, kLog2e, -log_sum2));
      o[j] = from_float<T>(j == label ? g - g * p : -g * p);
    }
  }
}

// Vector loads need element-aligned rows and a row long enough to hold one vector after its
// misaligned head; any row stride works (each row computes its own head).
template <typename T>
bool aligned_for_vectors(const void* ptr, int64_t vocab) {
  constexpr int kElems = VecTraits<T>::kElems;
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(T) == 0 && vocab >= 2 * kElems;
}

// The backward reads logits and writes `out` with the same per-row head: every row of both must sit
// at the same offset from a 16-byte boundary.
template <typename T>
bool same_row_alignment(const void* a, int64_t a_stride, const void* b, int64_t b_stride) {
  const auto offset = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  const int64_t bytes = static_cast<int64_t>(sizeof(T));
  return offset(a) == offset(b) && (a_stride * bytes) % 16 == (b_stride * bytes) % 16;
}

int threads_for(int64_t vocab, int elems_per_thread) {
  // Enough threads to cover the row in a few vector iterations, at least one warp.
  int threads = 32;
  while (threads < kThreads && static_cast<int64_t>(threads) * elems_per_thread * 4 < vocab) threads *= 2;
  return threads;
}

template <typename T>
cudaError_t fwd_typed(const RowsArgs& a, float* logp, float* lse) {
  const T* logits = static_cast<const T*>(a.logits);
  const int threads = threads_for(a.vocab, VecTraits<T>::kElems);
  if (aligned_for_vectors<T>(a.logits, a.vocab)) {
    token_logprobs_fwd_kernel<T, true><<<a.rows, threads, 0, a.stream>>>(logits, a.labels, a.vocab, a.row_stride,
                                                                          a.ignore_index, logp, lse);
  } else {
    token_logprobs_fwd_kernel<T, false><<<a.rows, threads, 0, a.stream>>>(logits, a.labels, a.vocab, a.row_stride,
                                                                           a.ignore_index, logp, lse);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const RowsArgs& a, const float* grad, const float* lse, void* out, int64_t out_stride) {
  const T* logits = static_cast<const T*>(a.logits);
  T* o = static_cast<T*>(out);
  const int threads = threads_for(a.vocab, VecTraits<T>::kElems);
  if (aligned_for_vectors<T>(a.logits, a.vocab) && aligned_for_vectors<T>(out, a.vocab) &&
      same_row_alignment<T>(a.logits, a.row_stride, out, out_stride)) {
    token_logprobs_bwd_kernel<T, true><<<a.rows, threads, 0, a.stream>>>(grad, logits, a.labels, lse, a.vocab,
                                                                          a.row_stride, a.ignore_index, o, out_stride);
  } else {
    token_logprobs_bwd_kernel<T, false><<<a.rows, threads, 0, a.stream>>>(
        grad, logits, a.labels, lse, a.vocab, a.row_stride, a.ignore_index, o, out_stride);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_token_logprobs_fwd(const RowsArgs& args, float* logp, float* lse) {
  if (args.rows == 0) return cudaSuccess;
  switch (args.dtype) {
    case LogitsDtype::kFloat32:
      return fwd_typed<float>(args, logp, lse);
    case LogitsDtype::kBFloat16:
      return fwd_typed<__nv_bfloat16>(args, logp, lse);
    case LogitsDtype::kFloat16:
      return fwd_typed<__half>(args, logp, lse);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_token_logprobs_bwd(const RowsArgs& args, const float* grad, const float* lse, void* out,
                                      int64_t out_stride) {
  if (args.rows == 0) return cudaSuccess;
  switch (args.dtype) {
    case LogitsDtype::kFloat32:
      return bwd_typed<float>(args, grad, lse, out, out_stride);
    case LogitsDtype::kBFloat16:
      return bwd_typed<__nv_bfloat16>(args, grad, lse, out, out_stride);
    case LogitsDtype::kFloat16:
      return bwd_typed<__half>(args, grad, lse, out, out_stride);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace synpo
