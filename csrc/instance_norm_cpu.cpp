// The double backward of instance normalisation (GroupNorm with one group per channel)
// on the CPU: instance_norm_double_backward(u, gy, x, mean, rstd, weight, gw_up, gb_up).
//
// Trajectory matching (MTT) differentiates through SGD steps of a ConvNet with instance
// norm, so every step runs instance norm's backward with create_graph and, in the outer
// backward, its double backward. PyTorch's double backward of native_group_norm is a
// composite of ~30 full-size elementwise ops and reductions; here it is two passes over
// each (n, c) group.
//
// Per group (M = H*W elements, mean m, rstd r, channel weight g):
//   xh = (x - m) r,  a = g gy,  A = mean(a),  B = mean(a xh)
//   first backward:  gx = r (a - A - xh B),  gw[c] = sum gy xh,  gb[c] = sum gy
// Given the cotangents u of gx, Gw of gw and Gb of gb, the double backward is
//   t        = r (u - mean(u) - xh mean(u xh))
//   d/d gy   = g t + Gw xh + Gb
//   d/d g    = sum over the group of gy t      (returned per (n, c); the caller sums n)
//   Q        = Gw gy - r (B u + mean(u xh) a)
//   R        = sum u (a - A - xh B)            (= <u, gx> / r)
//   d/d x    = r (Q - mean(Q) - xh mean(Q xh)) - (R r^2 / M) xh
// The sums needed (of gy, gy xh, u, u xh, u gy) are all taken in the first pass, in
// double; the second pass writes both outputs. guard_fast/models/instance_norm.py has the
// derivation's setting and the autograd wiring; tests/test_instance_norm.py holds it to
// PyTorch's own double backward and to gradgradcheck.
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace guard_fast {
namespace {

void check_instance_norm_double_backward(const at::Tensor& u, const at::Tensor& gy,
                                         const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& rstd, const at::Tensor& weight,
                                         const at::Tensor& gw_up, const at::Tensor& gb_up) {
  const char* op = "instance_norm_double_backward";
  TORCH_CHECK(x.dim() >= 3, op, ": x must be (N, C, ...), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": float32 or float64 only, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(u.sizes() == x.sizes() && gy.sizes() == x.sizes(), op,
              ": u and gy must have x's shape ", x.sizes(), ", got ", u.sizes(), " and ",
              gy.sizes());
  TORCH_CHECK(mean.numel() == N * C && rstd.numel() == N * C, op, ": mean and rstd must have ",
              N * C, " elements (N*C), got ", mean.numel(), " and ", rstd.numel());
  TORCH_CHECK(weight.numel() == C && gw_up.numel() == C && gb_up.numel() == C, op,
              ": weight, gw_up and gb_up must have C = ", C, " elements");
  for (const at::Tensor* t : {&u, &gy, &x, &mean, &rstd, &weight, &gw_up, &gb_up}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all inputs must be ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": all inputs must be on one device");
    TORCH_CHECK(t->is_contiguous(), op, ": inputs must be contiguous");
  }
}

template <typename scalar_t>
void double_backward_kernel(const scalar_t* pu, const scalar_t* pgy, const scalar_t* px,
                            const scalar_t* pmean, const scalar_t* prstd, const scalar_t* pw,
                            const scalar_t* pGw, const scalar_t* pGb, scalar_t* pggy,
                            scalar_t* pgx, scalar_t* pgw, int64_t NC, int64_t C, int64_t M) {
  at::parallel_for(0, NC, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b % C, o = b * M;
      const double m = pmean[b], r = prstd[b], g = pw[c], Gw = pGw[c], Gb = pGb[c];
      double Sgy = 0, Sgx = 0, Su = 0, Sux = 0, Sug = 0;
      for (int64_t i = 0; i < M; ++i) {
        const double xh = (px[o + i] - m) * r, gi = pgy[o + i], ui = pu[o + i];
        Sgy += gi;
        Sgx += gi * xh;
        Su += ui;
        Sux += ui * xh;
        Sug += ui * gi;
      }
      const double inv = 1.0 / static_cast<double>(M);
      const double A = g * Sgy * inv, B = g * Sgx * inv, mu_u = Su * inv, mux = Sux * inv;
      pgw[b] = static_cast<scalar_t>(r * (Sug - mu_u * Sgy - mux * Sgx));
      const double mQ = (Gw * Sgy - r * (B * Su + mux * g * Sgy)) * inv;
      const double mQx = (Gw * Sgx - r * (B * Sux + mux * g * Sgx)) * inv;
      const double k = (g * Sug - A * Su - B * Sux) * r * r * inv;
      for (int64_t i = 0; i < M; ++i) {
        const double xh = (px[o + i] - m) * r, gi = pgy[o + i], ui = pu[o + i];
        const double t = r * (ui - mu_u - xh * mux);
        pggy[o + i] = static_cast<scalar_t>(g * t + Gw * xh + Gb);
        const double q = Gw * gi - r * (B * ui + mux * g * gi);
        pgx[o + i] = static_cast<scalar_t>(r * (q - mQ - xh * mQx) - k * xh);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_double_backward_cpu(
    const at::Tensor& u, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& gw_up,
    const at::Tensor& gb_up) {
  check_instance_norm_double_backward(u, gy, x, mean, rstd, weight, gw_up, gb_up);
  const int64_t N = x.size(0), C = x.size(1), M = x.numel() / std::max<int64_t>(N * C, 1);
  auto ggy = at::empty(x.sizes(), x.options());
  auto gx = at::empty(x.sizes(), x.options());
  auto gw = at::empty({N, C}, x.options());
  if (x.numel() == 0) return {ggy, gx, gw.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_norm_double_backward_cpu", [&] {
    double_backward_kernel<scalar_t>(
        u.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
        gw_up.data_ptr<scalar_t>(), gb_up.data_ptr<scalar_t>(), ggy.data_ptr<scalar_t>(),
        gx.data_ptr<scalar_t>(), gw.data_ptr<scalar_t>(), N * C, C, M);
  });
  return {ggy, gx, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_double_backward_meta(
    const at::Tensor& u, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& gw_up,
    const at::Tensor& gb_up) {
  check_instance_norm_double_backward(u, gy, x, mean, rstd, weight, gw_up, gb_up);
  return {at::empty(x.sizes(), x.options()), at::empty(x.sizes(), x.options()),
          at::empty({x.size(0), x.size(1)}, x.options())};
}

}  // namespace guard_fast
