// CPU kernels for the attack steps pgd_step, mim_step and apgd_step (math in
// guard_fast.h and kernels/attack_steps.py).
//
// Each step is one elementwise pass over the flat range [0, N*M) of per-sample
// blocks, split over threads as cpu_utils.h describes; mim_step first sums |g|
// per sample with cpu_utils.h's split reduction.
//
// The per-element math is attack_steps.h's, shared with the CUDA kernels.
// Bit-exactness with eager PyTorch (fp32/fp64): every operation is a separate
// IEEE operation in acc_t, in eager's order. A compiler that fuses a*b + c into
// an FMA would break that (GCC does so by default where the target has FMA), so
// contraction is switched off for this whole file, headers included, before any
// include (a per-function setting would stop ATen's inline helpers from being
// inlined). The loops are plain scalar code that GCC vectorizes at -O3 (the row
// kernels below).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#define GUARD_FAST_FP_CONTRACT_OFF  // for attack_steps.h

#include "attack_steps.h"
#include "cpu_utils.h"
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace guard_fast {
namespace {

using cpu::for_each_row_segment;
using cpu::kCascade;
using cpu::kGrain;

// sum_j |g_j| over n elements in acc_t: 16 independent lanes (vectorizable), restarted
// every kCascade elements into an outer sum, so the rounding error grows with
// kCascade / 16 + n / kCascade instead of n.
template <typename scalar_t>
at::opmath_type<scalar_t> sum_abs(const scalar_t* g, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = 16;
  acc_t outer = 0;
  int64_t j = 0;
  const int64_t n_vec = n - n % L;
  while (j < n_vec) {
    const int64_t stop = std::min(n_vec, j + kCascade);
    acc_t s[L] = {};
    for (; j < stop; j += L) {
      for (int64_t l = 0; l < L; ++l) {
        s[l] += std::abs(static_cast<acc_t>(g[j + l]));
      }
    }
    acc_t t = 0;
    for (int64_t l = 0; l < L; ++l) {
      t += s[l];
    }
    outer += t;
  }
  for (; j < n; ++j) {
    outer += std::abs(static_cast<acc_t>(g[j]));
  }
  return outer;
}

// out[i] = sum_j |g_ij| for N samples of M elements.
template <typename scalar_t>
void rowwise_sum_abs(const scalar_t* g, int64_t N, int64_t M, at::opmath_type<scalar_t>* out) {
  cpu::rowwise_reduce(N, M, out, [&](int64_t start, int64_t len) {
    return sum_abs(g + start, len);
  });
}

// Row kernels: plain loops over `len` elements with __restrict__ pointers, so that GCC
// vectorizes them without runtime alias checks (with six pointers it gives those up).
template <typename scalar_t>
void pgd_row(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ xs,
             const scalar_t* __restrict__ gs, scalar_t* __restrict__ o, int64_t len,
             at::opmath_type<scalar_t> al, at::opmath_type<scalar_t> ep) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = attack::pgd(static_cast<acc_t>(xa[j]), static_cast<acc_t>(xs[j]),
                                static_cast<acc_t>(gs[j]), al, ep);
    o[j] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool kPerSample>
void mim_row(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ xs,
             const scalar_t* __restrict__ gs, const scalar_t* __restrict__ ms,
             scalar_t* __restrict__ o, scalar_t* __restrict__ mo, int64_t len,
             at::opmath_type<scalar_t> c, at::opmath_type<scalar_t> al,
             at::opmath_type<scalar_t> ep, at::opmath_type<scalar_t> de) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < len; ++j) {
    const scalar_t m = static_cast<scalar_t>(
        attack::mim_momentum(static_cast<acc_t>(gs[j]), static_cast<acc_t>(ms[j]), c, de));
    mo[j] = m;
    const acc_t v = attack::mim<kPerSample>(static_cast<acc_t>(xa[j]), static_cast<acc_t>(xs[j]),
                                            static_cast<acc_t>(m), al, ep);
    o[j] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void apgd_row(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ xo,
              const scalar_t* __restrict__ gs, const scalar_t* __restrict__ xs,
              scalar_t* __restrict__ o, int64_t len, at::opmath_type<scalar_t> step,
              at::opmath_type<scalar_t> ep, at::opmath_type<scalar_t> aa,
              at::opmath_type<scalar_t> bb) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < len; ++j) {
    const acc_t v = attack::apgd(static_cast<acc_t>(xa[j]), static_cast<acc_t>(xo[j]),
                                 static_cast<acc_t>(gs[j]), static_cast<acc_t>(xs[j]), step, ep,
                                 aa, bb);
    o[j] = static_cast<scalar_t>(v);
  }
}

}  // namespace

at::Tensor pgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                        double alpha, double eps) {
  check_pgd_step(x_adv, x, grad);
  const Blocks d = dense_blocks({x_adv, x, grad});
  at::Tensor out = d.new_output();
  if (d.empty()) {
    return out;
  }
  const int64_t total = d.N * d.M;
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [xa, xs, gs] = d.data<scalar_t, 3>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      pgd_row(xa + begin, xs + begin, gs + begin, o + begin, end - begin, al, ep);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mim_step_cpu(const at::Tensor& x_adv, const at::Tensor& x,
                                                const at::Tensor& grad, const at::Tensor& momentum,
                                                double alpha, double eps, double decay,
                                                bool per_sample) {
  check_mim_step(x_adv, x, grad, momentum);
  const Blocks d = dense_blocks({x_adv, x, grad, momentum});
  at::Tensor out = d.new_output();
  at::Tensor m_out = d.new_output();
  if (d.empty()) {
    return {out, m_out};
  }
  const int64_t N = d.N, M = d.M;
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "mim_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [xa, xs, gs, ms] = d.data<scalar_t, 4>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* mo = m_out.mutable_data_ptr<scalar_t>();
    // c_i = max(mean |g_i|, tiny) or c = max(sum |g|, tiny); tiny = finfo(dtype).tiny keeps a
    // zero gradient from producing 0/0 (it then adds nothing to the momentum).
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
    std::vector<acc_t> c(N);
    rowwise_sum_abs(gs, N, M, c.data());
    if (per_sample) {
      const acc_t m_acc = static_cast<acc_t>(M);
      for (int64_t i = 0; i < N; ++i) {
        c[i] = std::max(c[i] / m_acc, tiny);
      }
    } else {
      acc_t total = 0;
      for (int64_t i = 0; i < N; ++i) {
        total += c[i];
      }
      std::fill(c.begin(), c.end(), std::max(total, tiny));
    }
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t de = static_cast<acc_t>(decay);
    for_each_row_segment(N, M, [&](int64_t i, int64_t off, int64_t len) {
      auto row = per_sample ? &mim_row<scalar_t, true> : &mim_row<scalar_t, false>;
      row(xa + off, xs + off, gs + off, ms + off, o + off, mo + off, len, c[i], al, ep, de);
    });
  });
  return {out, m_out};
}

at::Tensor apgd_step_cpu(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                         const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x,
                         double eps, double a) {
  check_apgd_step(x_adv, x_adv_old, grad, step_size, x);
  const Blocks d = dense_blocks({x_adv, x_adv_old, grad, x});
  at::Tensor out = d.new_output();
  if (d.empty()) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "apgd_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // N step sizes in any float dtype / stride; eager multiplies by them in x's dtype, and
    // x's dtype converts exactly to acc_t, so round them to scalar_t first.
    const at::Tensor st = step_size.to(x_adv.scalar_type()).to(acc_dtype(x_adv.scalar_type()))
                              .contiguous();
    const acc_t* steps = st.const_data_ptr<acc_t>();
    const auto [xa, xo, gs, xs] = d.data<scalar_t, 4>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t aa = static_cast<acc_t>(a);
    const acc_t bb = static_cast<acc_t>(1.0 - a);  // (1 - a) in double, as Python computes it
    for_each_row_segment(d.N, d.M, [&](int64_t i, int64_t off, int64_t len) {
      apgd_row(xa + off, xo + off, gs + off, xs + off, o + off, len, steps[i], ep, aa, bb);
    });
  });
  return out;
}

at::Tensor square_window_cpu(const at::Tensor& x_best, const at::Tensor& lo, const at::Tensor& hi,
                             const at::Tensor& signs, int64_t vh, int64_t vw, int64_t s,
                             double step) {
  check_square_window(x_best, lo, hi, signs, vh, vw, s);
  const at::Tensor xb = x_best.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  const at::Tensor sg = signs.contiguous();
  at::Tensor out = xb.clone();   // everything outside the window is x_best
  const int64_t N = xb.size(0), C = xb.size(1), H = xb.size(2), W = xb.size(3);
  if (out.numel() == 0) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(xb.scalar_type(), "square_window_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ls = l.const_data_ptr<scalar_t>();
    const scalar_t* hs = h.const_data_ptr<scalar_t>();
    const scalar_t* ss = sg.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t st = static_cast<acc_t>(step);
    // one task per (sample, channel) plane; only the window's s x s pixels are touched
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(s * s, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t sign = static_cast<acc_t>(ss[p % C]);
        for (int64_t r = vh; r < vh + s; ++r) {
          const int64_t row = (p * H + r) * W;
          for (int64_t q = vw; q < vw + s; ++q) {
            const int64_t j = row + q;
            const acc_t v = attack::square(static_cast<acc_t>(o[j]), sign, st,
                                           static_cast<acc_t>(ls[j]), static_cast<acc_t>(hs[j]));
            o[j] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace guard_fast
