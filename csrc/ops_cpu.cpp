// CPU kernels for perturb, sqdiff_norm and sqdiff_norm_backward.
//
// Inputs arrive as raw per-sample blocks, split over threads as cpu_utils.h
// describes. Vector code uses at::vec::Vectorized on blocks of 2 * Vectorized<acc_t>::size()
// elements (fp16/bf16 are widened to float), with a scalar tail.
#include "cpu_utils.h"
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace guard_fast {
namespace {

using at::vec::Vectorized;
using cpu::for_each_row_segment;
using cpu::kCascade;

// Loads / stores kBlock consecutive scalar_t as two Vectorized<acc_t>.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = Vectorized<acc_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kBlock = 2 * AVec::size();
  static_assert(kSame || Vectorized<scalar_t>::size() == kBlock,
                "reduced-precision vectors must widen into two float vectors");

  static inline void load(const scalar_t* p, AVec& lo, AVec& hi) {
    if constexpr (kSame) {
      lo = AVec::loadu(p);
      hi = AVec::loadu(p + AVec::size());
    } else {
      auto both = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
      lo = std::get<0>(both);
      hi = std::get<1>(both);
    }
  }
  static inline void store(scalar_t* p, const AVec& lo, const AVec& hi) {
    if constexpr (kSame) {
      lo.store(p);
      hi.store(p + AVec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    }
  }
};

// sum_j d_j^2 over n elements, d = a - b (kDiff) or d = a, accumulated in acc_t.
template <typename scalar_t, bool kDiff>
at::opmath_type<scalar_t> sum_sq(const scalar_t* a, const scalar_t* b, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AVec = typename IO::AVec;
  constexpr int64_t B = IO::kBlock;
  AVec outer(acc_t(0));
  int64_t j = 0;
  const int64_t n_vec = n - n % B;
  while (j < n_vec) {
    const int64_t stop = std::min(n_vec, j + kCascade);
    AVec s0(acc_t(0)), s1(acc_t(0));
    for (; j < stop; j += B) {
      AVec a0, a1;
      IO::load(a + j, a0, a1);
      if constexpr (kDiff) {
        AVec b0, b1;
        IO::load(b + j, b0, b1);
        a0 = a0 - b0;
        a1 = a1 - b1;
      }
      s0 = at::vec::fmadd(a0, a0, s0);
      s1 = at::vec::fmadd(a1, a1, s1);
    }
    outer = outer + (s0 + s1);
  }
  acc_t lanes[AVec::size()];
  outer.store(lanes);
  acc_t s = 0;
  for (int64_t l = 0; l < AVec::size(); ++l) {
    s += lanes[l];
  }
  for (; j < n; ++j) {
    acc_t d = static_cast<acc_t>(a[j]);
    if constexpr (kDiff) {
      d -= static_cast<acc_t>(b[j]);
    }
    s += d * d;
  }
  return s;
}

// out[i] = sum_j d_ij^2 for N samples of M elements (b unused unless kDiff).
template <typename scalar_t, bool kDiff>
void rowwise_sum_sq(const scalar_t* a, const scalar_t* b, int64_t N, int64_t M,
                    at::opmath_type<scalar_t>* out) {
  cpu::rowwise_reduce(N, M, out, [&](int64_t start, int64_t len) {
    return sum_sq<scalar_t, kDiff>(a + start, kDiff ? b + start : nullptr, len);
  });
}

// ||g|| of one sample without overflow or underflow, in double: the largest magnitude m
// first, then m * sqrt(sum (g / m)^2) (as LAPACK's nrm2 scales). NaN if any element is NaN,
// inf if any is infinite. Used for the rare samples whose fast sum of squares left its range.
template <typename scalar_t>
double scaled_norm(const scalar_t* g, int64_t M) {
  double m = 0;
  for (int64_t j = 0; j < M; ++j) {
    const double a = std::abs(static_cast<double>(g[j]));
    if (std::isnan(a)) {
      return a;
    }
    m = std::max(m, a);
  }
  if (m == 0 || std::isinf(m)) {
    return m;
  }
  double s = 0;
  for (int64_t j = 0; j < M; ++j) {
    const double t = static_cast<double>(g[j]) / m;
    s += t * t;
  }
  return m * std::sqrt(s);
}

// Whether a fast sum of squares ss of M elements may have overflowed, or lost precision to
// squares below the smallest normal number: then the sample's norm is recomputed scaled.
template <typename acc_t>
bool outside_range(acc_t ss, int64_t M) {
  if (std::isnan(ss)) {
    return false;  // a NaN element: NaN either way
  }
  const acc_t floor = std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();
  return std::isinf(ss) || ss < floor * static_cast<acc_t>(M);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> perturb_cpu(const at::Tensor& x, const at::Tensor& g,
                                               double h, double tiny) {
  check_pair("perturb", "x", x, "g", g);
  const Blocks d = dense_blocks({x, g});
  const int64_t N = d.N, M = d.M;
  at::Tensor xp = d.new_output();
  at::Tensor norm = at::empty({N}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (N == 0) {
    return {xp, norm};
  }
  GUARD_FAST_DISPATCH_FLOATING(x.scalar_type(), "perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using AVec = typename IO::AVec;
    constexpr int64_t B = IO::kBlock;
    const auto [xs, gs] = d.data<scalar_t, 2>();
    scalar_t* out = xp.mutable_data_ptr<scalar_t>();
    acc_t* nrm = norm.mutable_data_ptr<acc_t>();

    rowwise_sum_sq<scalar_t, false>(gs, nullptr, N, M, nrm);
    // norm_i = sqrt(sum g^2), recomputed scaled where that sum left its range (overflow
    // above ~1.8e19 or underflow below ~1e-19 in float); step_i = h / max(norm_i, tiny), or 0 when g_i == 0
    // so that a zero gradient leaves x_i bit-identical (and h / tiny can never
    // turn 0 * inf into NaN, even for tiny == 0).
    std::vector<acc_t> step(N);
    const acc_t h_acc = static_cast<acc_t>(h);
    const acc_t tiny_acc = static_cast<acc_t>(tiny);
    for (int64_t i = 0; i < N; ++i) {
      const acc_t n = outside_range(nrm[i], M)
                          ? static_cast<acc_t>(scaled_norm(gs + i * M, M))
                          : std::sqrt(nrm[i]);
      nrm[i] = n;
      step[i] = n > acc_t(0) ? h_acc / std::max(n, tiny_acc) : acc_t(0);
    }
    if (M == 0) {
      return;
    }
    // xp = x + step_i * g, in acc_t, rounded once to scalar_t.
    for_each_row_segment(N, M, [&](int64_t i, int64_t off, int64_t len) {
      const acc_t s = step[i];
      const scalar_t* xr = xs + off;
      const scalar_t* gr = gs + off;
      scalar_t* o = out + off;
      if (s == acc_t(0)) {
        std::copy(xr, xr + len, o);
        return;
      }
      const AVec sv(s);
      int64_t j = 0;
      for (; j + B <= len; j += B) {
        AVec x0, x1, g0, g1;
        IO::load(xr + j, x0, x1);
        IO::load(gr + j, g0, g1);
        IO::store(o + j, at::vec::fmadd(g0, sv, x0), at::vec::fmadd(g1, sv, x1));
      }
      for (; j < len; ++j) {
        o[j] = static_cast<scalar_t>(
            std::fma(static_cast<acc_t>(gr[j]), s, static_cast<acc_t>(xr[j])));
      }
    });
  });
  return {xp, norm};
}

at::Tensor sqdiff_norm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_pair("sqdiff_norm", "a", a, "b", b);
  const Blocks d = dense_blocks({a, b});
  at::Tensor out = at::empty({d.N}, a.options().dtype(acc_dtype(a.scalar_type())));
  if (d.N == 0) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(a.scalar_type(), "sqdiff_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [as, bs] = d.data<scalar_t, 2>();
    rowwise_sum_sq<scalar_t, true>(as, bs, d.N, d.M, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& a,
                                                            const at::Tensor& b) {
  check_sqdiff_norm_backward(grad_out, a, b);
  const Blocks d = dense_blocks({a, b});
  at::Tensor grad_a = d.new_output();
  at::Tensor grad_b = d.new_output();
  if (d.empty()) {
    return {grad_a, grad_b};
  }
  // grad_out may be any float dtype and strided (e.g. expanded from a scalar);
  // it is only N numbers, so convert it up front.
  at::Tensor go = grad_out.to(acc_dtype(a.scalar_type())).contiguous();
  GUARD_FAST_DISPATCH_FLOATING(a.scalar_type(), "sqdiff_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using IO = VecIO<scalar_t>;
    using AVec = typename IO::AVec;
    constexpr int64_t B = IO::kBlock;
    const auto [as, bs] = d.data<scalar_t, 2>();
    scalar_t* ga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    const acc_t* gos = go.const_data_ptr<acc_t>();
    // d/da sum_j (a_j - b_j)^2 * go_i = 2 * go_i * (a - b); d/db is its negative.
    for_each_row_segment(d.N, d.M, [&](int64_t i, int64_t off, int64_t len) {
      const acc_t c = acc_t(2) * gos[i];
      const AVec cv(c);
      int64_t j = 0;
      for (; j + B <= len; j += B) {
        AVec a0, a1, b0, b1;
        IO::load(as + off + j, a0, a1);
        IO::load(bs + off + j, b0, b1);
        const AVec r0 = (a0 - b0) * cv;
        const AVec r1 = (a1 - b1) * cv;
        IO::store(ga + off + j, r0, r1);
        IO::store(gb + off + j, r0.neg(), r1.neg());
      }
      for (; j < len; ++j) {
        const acc_t r =
            (static_cast<acc_t>(as[off + j]) - static_cast<acc_t>(bs[off + j])) * c;
        ga[off + j] = static_cast<scalar_t>(r);
        gb[off + j] = static_cast<scalar_t>(-r);
      }
    });
  });
  return {grad_a, grad_b};
}

}  // namespace guard_fast
