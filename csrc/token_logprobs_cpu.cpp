// CPU kernels of the fused per-token log-softmax gather (see synpo_kernels/ops/token_logprobs.py).
//
// Forward reads each scored row of logits once: a blocked online max m and s = sum exp(z - m) in
// fp32 (fp64 for fp64 logits), then logp = (z[label] - m) - log s; it keeps (m, log s) per row
// (`lse`, (rows, 2)). Backward reads the row once more and writes
// grad = g * (onehot - exp((z - m) - log s)) in the logits' dtype, optionally over the logits
// buffer. Never exp(z - lse) with lse = m + log s rounded: for a confident token (p near 1,
// |lse| ~ 20-40) 1 - p would carry lse's rounding, ~10x plain fp32 PyTorch's error; z - m is exact
// near the max. Rows whose label is ignore_index are never read.
//
// The float inner loops are `omp simd` loops over a branch-free exp, compiled twice by GCC's
// target_clones (AVX-512, AVX2+FMA, SSE4.2 and the baseline) and picked at load time, so one binary
// is fast on current CPUs and still runs on old ones. The build passes -fno-trapping-math: without
// it GCC will not if-convert the float compares, and the loops stay scalar.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "token_logprobs.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && (__GNUC__ >= 12) && \
    defined(__linux__)
#define SYNPO_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#else
#define SYNPO_MULTIVERSION
#endif

namespace synpo {
namespace {

// Elements per block: 8 KiB of fp32 stays in L1 next to the converted copy of a 16-bit block.
constexpr int64_t kBlock = 2048;

constexpr float kLog2e = 1.44269504088896341f;

// 2^t for t <= 0 (callers pass (x - max) * log2(e), x - max formed first: exact near the max):
// t = n + f with f in [-1/2, 1/2], a degree-6 minimax polynomial for 2^f (max relative error 9.2e-7, measured
// against double exp on N(0, 3) logits), and 2^n from the exponent bits. Branch-free, so `omp simd`
// loops vectorize it; 1.4-1.8x faster than a Cody-Waite expf at the same accuracy. Inputs below
// -126 are clamped (2^-126 ~ 1e-38: 0 for every purpose here); NaN stays NaN.
inline float exp2_nonpositive(float t) {
  t = t < -126.0f ? -126.0f : t;
  const float n = __builtin_rintf(t);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// NaN never wins the max; it reaches the sum of exps instead, so the row's lse is NaN (as with
// torch.log_softmax), never silently finite.
SYNPO_MULTIVERSION float block_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum exp(x[i] - max). (x - max) first, not fma(x, log2 e, -max * log2 e), whose rounding of
// max * log2 e would put an error of max's magnitude on every term.
SYNPO_MULTIVERSION float block_sum_exp(const float* x, int64_t n, float max) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp2_nonpositive((x[i] - max) * kLog2e);
  return s;
}

// For the block that holds a new row max: the sum of exp(x[i] - max) over the x[i] != max, and in
// *ties the count of x[i] == max (terms of exactly 1). Kept apart so that a confident row's small
// terms (each below half an ulp of 1) are not absorbed by the max's 1 in its SIMD lane.
SYNPO_MULTIVERSION float block_sum_exp_below(const float* x, int64_t n, float max, float* ties) {
  float s = 0.0f;
  float c = 0.0f;
#pragma omp simd reduction(+ : s, c)
  for (int64_t i = 0; i < n; ++i) {
    const bool at_max = x[i] == max;
    s += at_max ? 0.0f : exp2_nonpositive((x[i] - max) * kLog2e);
    c += at_max ? 1.0f : 0.0f;
  }
  *ties = c;
  return s;
}

// out[i] = scale * exp((x[i] - max) - log_sum); out may alias x. log_sum >= 0 (the max's term is 1).
SYNPO_MULTIVERSION void block_scaled_softmax(const float* x, int64_t n, float max, float log_sum, float scale,
                                             float* out) {
  const float log_sum2 = log_sum * kLog2e;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = scale * exp2_nonpositive(__builtin_fmaf(x[i] - max, kLog2e, -log_sum2));
}

// 16-bit <-> fp32 block conversions (c10's conversions are branch-free bit manipulation).
template <typename scalar_t>
SYNPO_MULTIVERSION void block_to_float(const scalar_t* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
SYNPO_MULTIVERSION void block_from_float(const float* src, int64_t n, scalar_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// A float view of logits[start : start + n]: the data itself for fp32, a converted copy otherwise.
template <typename scalar_t>
inline const float* float_block(const scalar_t* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    block_to_float(src, n, scratch);
    return scratch;
  }
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(vocab, 1)); }

struct RowLayout {
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  int64_t ignore_index;
};

// Records the first row with an out-of-range label (the kernels skip such rows: no OOB read).
struct BadLabel {
  std::atomic<int64_t> row{-1};
  void record(int64_t r) {
    int64_t expected = -1;
    row.compare_exchange_strong(expected, r);
  }
};

// A row with no target: an ignored label scores 0 (log-prob and both lse entries; a zero gradient
// row), a label outside [0, vocab) is recorded and gets NaN, never an out-of-bounds read.
// lse: (rows, 2), (max, log sum exp(z - max)) per row. False: the caller computes.
template <typename T>
bool untargeted_forward_row(int64_t r, int64_t label, const RowLayout& L, BadLabel& bad, T* logp, T* lse) {
  if (label == L.ignore_index) {
    logp[r] = lse[2 * r] = lse[2 * r + 1] = T(0);
    return true;
  }
  if (label < 0 || label >= L.vocab) {
    bad.record(r);
    logp[r] = lse[2 * r] = lse[2 * r + 1] = std::numeric_limits<T>::quiet_NaN();
    return true;
  }
  return false;
}

template <typename T>
bool untargeted_backward_row(int64_t r, int64_t label, const RowLayout& L, BadLabel& bad, T* out_row) {
  if (label == L.ignore_index) {
    std::fill(out_row, out_row + L.vocab, static_cast<T>(0.0f));
    return true;
  }
  if (label < 0 || label >= L.vocab) {
    bad.record(r);
    std::fill(out_row, out_row + L.vocab, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
    return true;
  }
  return false;
}

template <typename scalar_t>
void forward_rows(const scalar_t* logits, const int64_t* labels, const RowLayout& L, float* logp, float* lse,
                  BadLabel& bad) {
  at::parallel_for(0, L.rows, grain_rows(L.vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      if (untargeted_forward_row(r, label, L, bad, logp, lse)) continue;
      const scalar_t* z = logits + r * L.row_stride;
      constexpr float kInf = std::numeric_limits<float>::infinity();
      // s = sum exp(z - running_max) = 1 + rest: the max's own term is kept out of the float sum, so
      // that rest (1 - p of a confident target) keeps its relative precision; log s = log1p(rest).
      float running_max = -kInf;
      float rest = 0.0f;
      for (int64_t start = 0; start < L.vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, L.vocab - start);
        const float* x = float_block(z + start, n, scratch);
        const float block_m = block_max(x, n);
        if (block_m == -kInf) {
          // Only -inf (masked vocabulary) and NaN: adds nothing, but a NaN must still poison.
          rest += block_sum_exp(x, n, 0.0f) * 0.0f;
        } else if (block_m > running_max) {
          // The new max's term leaves the sum: rest' = (1 + rest) e^(old - new) + below + ties - 1.
          const float carried = running_max == -kInf ? rest : (1.0f + rest) * std::exp(running_max - block_m);
          float ties = 0.0f;
          const float below = block_sum_exp_below(x, n, block_m, &ties);
          rest = carried + below + (ties - 1.0f);
          running_max = block_m;
        } else {
          // Ties with the max here are terms of 1 like any other: p <= 1/2, no precision at stake.
          rest += block_sum_exp(x, n, running_max);
        }
      }
      // +inf in the row: NaN, as log_softmax (inf - inf); an all -inf row: log 0 (its logp is NaN).
      const float log_sum = running_max == kInf    ? std::numeric_limits<float>::quiet_NaN()
                            : running_max == -kInf ? std::log(rest)
                                                   : std::log1p(rest);
      lse[2 * r] = running_max;
      lse[2 * r + 1] = log_sum;
      logp[r] = (static_cast<float>(z[label]) - running_max) - log_sum;
    }
  });
}

template <typename scalar_t>
void backward_rows(const float* grad, const scalar_t* logits, const int64_t* labels, const float* lse,
                   const RowLayout& L, scalar_t* out, int64_t out_stride, BadLabel& bad) {
  at::parallel_for(0, L.rows, grain_rows(L.vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      scalar_t* o = out + r * out_stride;
      if (untargeted_backward_row(r, label, L, bad, o)) continue;
      const float g = grad[r];
      if (g == 0.0f) {  // a token with no gradient: exact zeros, no exp work
        std::fill(o, o + L.vocab, static_cast<scalar_t>(0.0f));
        continue;
      }
      const scalar_t* z = logits + r * L.row_stride;
      const float max = lse[2 * r];
      const float log_sum = lse[2 * r + 1];
      const float log_p_label = (static_cast<float>(z[label]) - max) - log_sum;  // before o overwrites z
      for (int64_t start = 0; start < L.vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, L.vocab - start);
        if constexpr (std::is_same_v<scalar_t, float>) {
          block_scaled_softmax(z + start, n, max, log_sum, -g, o + start);
        } else {
          const float* x = float_block(z + start, n, scratch);
          block_scaled_softmax(x, n, max, log_sum, -g, scratch);
          block_from_float(scratch, n, o + start);
        }
      }
      // The target entry g * (1 - p) = -g * expm1(log p): relative precision even for p near 1.
      o[label] = static_cast<scalar_t>(-g * std::expm1(log_p_label));
    }
  });
}

// fp64 logits (gradcheck, references): plain scalar loops in double.
void forward_rows_f64(const double* logits, const int64_t* labels, const RowLayout& L, double* logp, double* lse,
                      BadLabel& bad) {
  at::parallel_for(0, L.rows, grain_rows(L.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      if (untargeted_forward_row(r, label, L, bad, logp, lse)) continue;
      const double* z = logits + r * L.row_stride;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < L.vocab; ++j) m = z[j] > m ? z[j] : m;
      double s = 0.0;
      for (int64_t j = 0; j < L.vocab; ++j) s += std::exp(z[j] - m);  // NaN reaches s, as intended
      lse[2 * r] = m;
      lse[2 * r + 1] = std::log(s);
      logp[r] = (z[label] - m) - lse[2 * r + 1];
    }
  });
}

void backward_rows_f64(const double* grad, const double* logits, const int64_t* labels, const double* lse,
                       const RowLayout& L, double* out, int64_t out_stride, BadLabel& bad) {
  at::parallel_for(0, L.rows, grain_rows(L.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      double* o = out + r * out_stride;
      if (untargeted_backward_row(r, label, L, bad, o)) continue;
      const double* z = logits + r * L.row_stride;
      const double g = grad[r];
      const double m = lse[2 * r];
      const double log_sum = lse[2 * r + 1];
      const double p_label = std::exp((z[label] - m) - log_sum);
      for (int64_t j = 0; j < L.vocab; ++j) o[j] = -g * std::exp((z[j] - m) - log_sum);
      o[label] = g - g * p_label;
    }
  });
}

void raise_if_bad(const BadLabel& bad, const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const int64_t r = bad.row.load();
  TORCH_CHECK_VALUE(r < 0, "labels: value ", labels.data_ptr<int64_t>()[r], " at row ", r, " is outside [0, ",
                    vocab, ") and is not ignore_index (", ignore_index, ")");
}

RowLayout layout_of(const at::Tensor& logits, int64_t ignore_index) {
  return {logits.size(0), logits.size(1), logits.stride(0), ignore_index};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels);
  const RowLayout L = layout_of(logits, ignore_index);
  const auto acc = accumulation_dtype(logits.scalar_type());
  at::Tensor logp = at::empty({L.rows}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({L.rows, 2}, logits.options().dtype(acc));
  BadLabel bad;
  const int64_t* lab = labels.data_ptr<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      forward_rows(logits.data_ptr<float>(), lab, L, logp.data_ptr<float>(), lse.data_ptr<float>(), bad);
      break;
    case at::kBFloat16:
      forward_rows(logits.data_ptr<c10::BFloat16>(), lab, L, logp.data_ptr<float>(), lse.data_ptr<float>(), bad);
      break;
    case at::kHalf:
      forward_rows(logits.data_ptr<c10::Half>(), lab, L, logp.data_ptr<float>(), lse.data_ptr<float>(), bad);
      break;
    case at::kDouble:
      forward_rows_f64(logits.data_ptr<double>(), lab, L, logp.data_ptr<double>(), lse.data_ptr<double>(), bad);
      break;
    default:
      TORCH_CHECK_TYPE(false, "logits: unsupported dtype ", logits.scalar_type());
  }
  raise_if_bad(bad, labels, L.vocab, ignore_index);
  return {logp, lse};
}

namespace {

void backward_into(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                   const at::Tensor& lse, int64_t ignore_index, at::Tensor& out) {
  check_token_logprobs_inputs(logits, labels);
  check_token_logprobs_bwd_inputs(grad_logp, logits, lse);
  const RowLayout L = layout_of(logits, ignore_index);
  BadLabel bad;
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t out_stride = out.stride(0);
  switch (logits.scalar_type()) {
    case at::kFloat:
      backward_rows(grad_logp.data_ptr<float>(), logits.data_ptr<float>(), lab, lse.data_ptr<float>(), L,
                    out.data_ptr<float>(), out_stride, bad);
      break;
    case at::kBFloat16:
      backward_rows(grad_logp.data_ptr<float>(), logits.data_ptr<c10::BFloat16>(), lab, lse.data_ptr<float>(), L,
                    out.data_ptr<c10::BFloat16>(), out_stride, bad);
      break;
    case at::kHalf:
      backward_rows(grad_logp.data_ptr<float>(), logits.data_ptr<c10::Half>(), lab, lse.data_ptr<float>(), L,
                    out.data_ptr<c10::Half>(), out_stride, bad);
      break;
    case at::kDouble:
      backward_rows_f64(grad_logp.data_ptr<double>(), logits.data_ptr<double>(), lab, lse.data_ptr<double>(), L,
                        out.data_ptr<double>(), out_stride, bad);
      break;
    default:
      TORCH_CHECK_TYPE(false, "logits: unsupported dtype ", logits.scalar_type());
  }
  raise_if_bad(bad, labels, L.vocab, ignore_index);
}

// A large, fresh gradient buffer costs more in 4 KiB page faults than the kernel spends computing
// it (measured: ~0.2 s of faults for a 512 MiB buffer vs ~0.06 s of kernel). Asking for transparent
// huge pages on the untouched allocation before the kernel writes it removes almost all of them.
// Only a hint: a kernel with THP off ignores it.
at::Tensor empty_gradient_buffer(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first && last - first >= 2 * kHuge) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index) {
  at::Tensor out = empty_gradient_buffer(logits);
  backward_into(grad_logp, logits, labels, lse, ignore_index, out);
  return out;
}

void token_logprobs_bwd_inplace_cpu(at::Tensor& logits, const at::Tensor& grad_logp, const at::Tensor& labels,
                                    const at::Tensor& lse, int64_t ignore_index) {
  backward_into(grad_logp, logits, labels, lse, ignore_index, logits);
}

TORCH_LIBRARY_IMPL(synpo_kernels, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
  m.impl("token_logprobs_bwd_", &token_logprobs_bwd_inplace_cpu);
}

}  // namespace synpo
