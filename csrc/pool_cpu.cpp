// 2x2 average pooling with stride 2 (floor mode, no padding) on the CPU, and its backward:
//
//   avg_pool2x2(x) -> y            y[n,c,i,j] = (x[2i,2j] + x[2i,2j+1] + x[2i+1,2j] + x[2i+1,2j+1]) / 4
//   avg_pool2x2_backward(gy, H, W) -> gx    gx[n,c,a,b] = gy[a/2, b/2] / 4 inside the pooled
//                                           2*(H/2) x 2*(W/2) region, 0 in a dropped odd row/column
//
// Both are linear and each is the other's adjoint, so the pair is differentiable any number
// of times (guard_fast/models/pool.py). MTT's unroll runs pooling's forward and backward
// twice per layer and step; PyTorch's generic CPU avg_pool2d kernels (padding, ceil mode,
// divisor handling) took ~15% of an iteration. Inputs must be contiguous (N, C, H, W).
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

namespace guard_fast {
namespace {

void check_pool(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": expected (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": float32 or float64 only, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": the input must be contiguous");
}

}  // namespace

at::Tensor avg_pool2x2_cpu(const at::Tensor& x) {
  check_pool("avg_pool2x2", x);
  const int64_t NC = x.size(0) * x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H / 2, Wo = W / 2;
  auto y = at::empty({x.size(0), x.size(1), Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avg_pool2x2_cpu", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, NC * Ho, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / Ho, i = r % Ho;
        const scalar_t* a = px + (p * H + 2 * i) * W;
        const scalar_t* b = a + W;
        scalar_t* out = py + r * Wo;
        for (int64_t j = 0; j < Wo; ++j)
          out[j] = ((a[2 * j] + a[2 * j + 1]) + (b[2 * j] + b[2 * j + 1])) * scalar_t(0.25);
      }
    });
  });
  return y;
}

at::Tensor avg_pool2x2_backward_cpu(const at::Tensor& gy, int64_t H, int64_t W) {
  check_pool("avg_pool2x2_backward", gy);
  const int64_t Ho = gy.size(2), Wo = gy.size(3);
  TORCH_CHECK(H / 2 == Ho && W / 2 == Wo, "avg_pool2x2_backward: gy is ", gy.sizes(),
              ", which is not the pooled size of ", H, " x ", W);
  const int64_t NC = gy.size(0) * gy.size(1);
  auto gx = at::empty({gy.size(0), gy.size(1), H, W}, gy.options());
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "avg_pool2x2_backward_cpu", [&] {
    const scalar_t* pg = gy.data_ptr<scalar_t>();
    scalar_t* px = gx.data_ptr<scalar_t>();
    at::parallel_for(0, NC * H, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / H, a = r % H, i = a / 2;
        scalar_t* out = px + r * W;
        if (i >= Ho) {  // the dropped last row of an odd height
          for (int64_t b = 0; b < W; ++b) out[b] = scalar_t(0);
          continue;
        }
        const scalar_t* g = pg + (p * Ho + i) * Wo;
        for (int64_t j = 0; j < Wo; ++j) {
          const scalar_t v = g[j] * scalar_t(0.25);
          out[2 * j] = v;
          out[2 * j + 1] = v;
        }
        if (W % 2) out[W - 1] = scalar_t(0);
      }
    });
  });
  return gx;
}

at::Tensor avg_pool2x2_meta(const at::Tensor& x) {
  check_pool("avg_pool2x2", x);
  return at::empty({x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2}, x.options());
}

at::Tensor avg_pool2x2_backward_meta(const at::Tensor& gy, int64_t H, int64_t W) {
  check_pool("avg_pool2x2_backward", gy);
  TORCH_CHECK(H / 2 == gy.size(2) && W / 2 == gy.size(3), "avg_pool2x2_backward: gy is ",
              gy.sizes(), ", which is not the pooled size of ", H, " x ", W);
  return at::empty({gy.size(0), gy.size(1), H, W}, gy.options());
}

}  // namespace guard_fast
