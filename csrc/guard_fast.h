// guard_fast C++/CUDA ops: shared declarations.
//
// Three ops make up the per-sample arithmetic of the GUARD penalty (a
// finite-difference estimate of the curvature of the loss around each sample):
//
//   perturb(x, g, h, tiny) -> (xp, norm)
//       x, g: (N, ...) same shape/dtype/device.  Per sample i:
//         norm_i = sqrt(sum_j g_ij^2)                       (accumulated in acc_t)
//         xp_i   = x_i + h * g_i / max(norm_i, tiny)          (stored in x.dtype)
//       xp is x moved a step of length h along the unit gradient direction;
//       a zero gradient (norm_i == 0) leaves the sample unchanged.
//   sqdiff_norm(a, b) -> s
//       s_i = sum_j (a_ij - b_ij)^2                         (N,) in acc_t
//   sqdiff_norm_backward(grad_out, a, b) -> (grad_a, grad_b)
//       grad_a_i = 2 * (a_i - b_i) * grad_out_i, grad_b = -grad_a (a.dtype)
//
// Four more ops fuse the per-step tensor work of the L-inf attacks (see
// kernels/attack_steps.py for the math, with the references the other backends must
// match, and guard_fast/ops.py for the Python ops):
//
//   pgd_step(x_adv, x, grad, alpha, eps) -> out
//       out = clamp(x + clamp(x_adv + alpha*sign(grad) - x, -eps, eps), 0, 1)
//   mim_step(x_adv, x, grad, momentum, alpha, eps, decay, per_sample) -> (out, m)
//       c_i = max(mean_j |g_ij|, tiny) (per_sample) or c = max(sum |g|, tiny) (batch),
//       m = g / c + decay * momentum, out = x_adv + alpha * sign(m) projected
//       (per_sample: like pgd_step; batch: clamp(clamp(v, x - eps, x + eps), 0, 1))
//   apgd_step(x_adv, x_adv_old, grad, step_size, x, eps, a) -> out
//       lo = max(x - eps, 0), hi = min(x + eps, 1), z = clamp(x_adv + step_i*sign(g), lo, hi),
//       out = clamp((z - x_adv)*a + x_adv + (x_adv - x_adv_old)*(1 - a), lo, hi)
//   square_window(x_best, lo, hi, signs, vh, vw, s, step) -> out
//       a contiguous copy of x_best whose window [vh, vh+s) x [vw, vw+s) is
//       clamp(x_best + step * signs[c], lo, hi) (Square attack's candidate)
//
// They compute in acc_t with one rounding per operation in the order eager
// PyTorch uses (no FMA contraction), so fp32/fp64 elementwise results equal the
// references bit for bit; fp16/bf16 round once, at the end.
//
// acc_t is float for float16/bfloat16/float32 inputs and double for float64
// (at::opmath_type). Kernels see each sample as one dense block of M elements
// (see dense_all below), so sample i is elements [i*M, (i+1)*M) of the raw
// buffer whatever the logical layout (contiguous or channels_last).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

namespace guard_fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- input validation (common.cpp) -----------------------------------------
// Each op's CPU, CUDA and Meta kernels run the same checks, so the three report the
// same errors.

// Checks that a and b are floating-point tensors of the same shape, dtype and
// device with at least one (batch) dimension. `op`, `an`, `bn` name the op and
// the arguments in the error messages. (perturb and sqdiff_norm check just this.)
void check_pair(const char* op, const char* an, const at::Tensor& a,
                const char* bn, const at::Tensor& b);

// check_pair(a, b), and grad_out floating, shape (N,) with N = a.size(0), on a's device.
void check_sqdiff_norm_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                const at::Tensor& b);

// Every tensor like x_adv (check_pair); apgd's step_size floating, shape (N,), on x_adv's
// device.
void check_pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad);
void check_mim_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                    const at::Tensor& momentum);
void check_apgd_step(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                     const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x);

// x_best, lo, hi (N, C, H, W) alike; signs C values of x_best's dtype and device; the
// s x s window at (vh, vw) inside H x W.
void check_square_window(const at::Tensor& x_best, const at::Tensor& lo, const at::Tensor& hi,
                         const at::Tensor& signs, int64_t vh, int64_t vw, int64_t s);

// float for fp16/bf16/fp32, double for fp64.
at::ScalarType acc_dtype(at::ScalarType t);

// ---- layout (common.cpp) ---------------------------------------------------

// True when t is non-overlapping and dense and the batch dimension is outermost
// in memory (stride(0) == numel / N, or N == 1): then sample i occupies the
// elements [i*M, (i+1)*M) counted from t.data_ptr(), in some order that only
// depends on the strides. Holds for contiguous and channels_last tensors.
bool batch_dense(const at::Tensor& t);

// All tensors of ts (same shapes) unchanged when they share strides and are
// batch_dense, else contiguous copies of all of them, so that every one can be
// read as raw per-sample blocks in the same element order. Works on symbolic
// shapes too (used by the Meta kernels), so the real kernels and the fake ones
// agree on output strides.
std::vector<at::Tensor> dense_all(at::TensorList ts);

// Uninitialised tensor with t's sizes, strides, dtype and device (t must come
// out of dense_all, so the result is dense in the same per-sample order).
at::Tensor empty_same_layout(const at::Tensor& t);

// The tensor arguments of one kernel call as raw per-sample blocks: dense_all of
// them, and the block shape, N samples of M elements (real shapes only).
struct Blocks {
  std::vector<at::Tensor> t;
  int64_t N = 0;
  int64_t M = 0;

  bool empty() const { return N == 0 || M == 0; }
  // an output in the inputs' per-sample order
  at::Tensor new_output() const { return empty_same_layout(t[0]); }
  // the data of the first K tensors, for a structured binding:
  //   const auto [xa, xs, gs] = d.data<scalar_t, 3>();
  template <typename scalar_t, size_t K>
  std::array<const scalar_t*, K> data() const {
    std::array<const scalar_t*, K> p{};
    for (size_t k = 0; k < K; ++k) {
      p[k] = t[k].const_data_ptr<scalar_t>();
    }
    return p;
  }
};
Blocks dense_blocks(at::TensorList ts);

// AT_DISPATCH over the four dtypes every op takes (float32, float64, bfloat16,
// float16); the kernel files include ATen/Dispatch.h.
#define GUARD_FAST_DISPATCH_FLOATING(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, name, __VA_ARGS__)

// ---- kernels ---------------------------------------------------------------
// One signature per op, declared for each backend: <op>_cpu (ops_cpu.cpp,
// attack_steps_cpu.cpp), <op>_meta (common.cpp: shapes, dtypes and strides only) and
// <op>_cuda (ops_cuda.cu, attack_steps_cuda.cu).
#define GUARD_FAST_DECLARE_KERNELS(backend)                                                       \
  std::tuple<at::Tensor, at::Tensor> perturb_##backend(const at::Tensor& x,                       \
                                                       const at::Tensor& g, double h,             \
                                                       double tiny);                              \
  at::Tensor sqdiff_norm_##backend(const at::Tensor& a, const at::Tensor& b);                     \
  std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_##backend(                              \
      const at::Tensor& grad_out, const at::Tensor& a, const at::Tensor& b);                      \
  at::Tensor pgd_step_##backend(const at::Tensor& x_adv, const at::Tensor& x,                     \
                                const at::Tensor& grad, double alpha, double eps);                \
  std::tuple<at::Tensor, at::Tensor> mim_step_##backend(                                          \
      const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,                       \
      const at::Tensor& momentum, double alpha, double eps, double decay, bool per_sample);       \
  at::Tensor apgd_step_##backend(const at::Tensor& x_adv, const at::Tensor& x_adv_old,            \
                                 const at::Tensor& grad, const at::Tensor& step_size,             \
                                 const at::Tensor& x, double eps, double a);                      \
  at::Tensor square_window_##backend(const at::Tensor& x_best, const at::Tensor& lo,              \
                                     const at::Tensor& hi, const at::Tensor& signs,               \
                                     int64_t vh, int64_t vw, int64_t s, double step);

GUARD_FAST_DECLARE_KERNELS(cpu)
GUARD_FAST_DECLARE_KERNELS(meta)
#ifdef GUARD_FAST_WITH_CUDA
GUARD_FAST_DECLARE_KERNELS(cuda)
#endif

// FAB's L-inf projection onto a hyperplane inside the unit box, per row (fab_cpu.cpp).
// CPU only: on GPUs the batched torch form runs inside the attack's CUDA graph.
at::Tensor fab_project_cpu(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b);
at::Tensor fab_project_meta(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b);

// The double backward of instance norm (GroupNorm, one group per channel), per (n, c)
// group in two passes (instance_norm_cpu.cpp). CPU only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_double_backward_cpu(
    const at::Tensor& u, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& gw_up,
    const at::Tensor& gb_up);
std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_double_backward_meta(
    const at::Tensor& u, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& gw_up,
    const at::Tensor& gb_up);

// 2x2 / stride-2 average pooling and its backward (pool_cpu.cpp). CPU only.
at::Tensor avg_pool2x2_cpu(const at::Tensor& x);
at::Tensor avg_pool2x2_backward_cpu(const at::Tensor& gy, int64_t H, int64_t W);
at::Tensor avg_pool2x2_meta(const at::Tensor& x);
at::Tensor avg_pool2x2_backward_meta(const at::Tensor& gy, int64_t H, int64_t W);

// Whether this library was built with the CUDA kernels (register.cpp).
bool cuda_compiled();

}  // namespace guard_fast
