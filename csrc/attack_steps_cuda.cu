// CUDA kernels for the attack steps pgd_step, mim_step, apgd_step and
// square_window (math in guard_fast.h and kernels/attack_steps.py; launch and
// check helpers in cuda_utils.cuh).
//
//   pgd_step_kernel, apgd_step_kernel, mim_apply_kernel
//       grid-stride elementwise passes over the N*M per-sample blocks, in
//       16-byte packs where possible (cuda_utils.cuh); apgd's step size and
//       mim's scale are looked up per sample at row = j / M.
//   abs_sum_partial_kernel + mim_scale_kernel
//       mim_step's reduction: block (i, c) sums |g| over chunk c of sample i
//       into partial[i * chunks + c] (no atomics, so results are deterministic),
//       then one block per sample (per_sample) or one block for the batch adds
//       the partials and writes c_i = max(sum / M, tiny) or c = max(sum, tiny).
//
// The per-element math is attack_steps.h's, shared with the CPU kernels; on the
// device its operations are the __f*_rn / __d*_rn intrinsics, which nvcc never
// contracts into FMAs, so fp32/fp64 results equal eager PyTorch's bit for bit.
#include "attack_steps.h"
#include "cuda_utils.cuh"
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <limits>

namespace guard_fast {
namespace {

using namespace gpu;

// ---- pgd_step --------------------------------------------------------------

template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    pgd_step_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t total,
                    at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride) {
    const auto pa = load_pack<V>(xa, j);
    const auto px = load_pack<V>(x, j);
    const auto pg = load_pack<V>(g, j);
    Pack<scalar_t, V> po;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      po.v[k] = static_cast<scalar_t>(attack::pgd(static_cast<acc_t>(pa.v[k]),
                                                  static_cast<acc_t>(px.v[k]),
                                                  static_cast<acc_t>(pg.v[k]), alpha, eps));
    }
    store_pack(out, j, po);
  }
}

// ---- apgd_step -------------------------------------------------------------

template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    apgd_step_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ xo,
                     const scalar_t* __restrict__ g, const at::opmath_type<scalar_t>* __restrict__ steps,
                     const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t M,
                     int64_t total, at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> a,
                     at::opmath_type<scalar_t> b) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride) {
    const auto pa = load_pack<V>(xa, j);
    const auto po_ = load_pack<V>(xo, j);
    const auto pg = load_pack<V>(g, j);
    const auto px = load_pack<V>(x, j);
    Pack<scalar_t, V> pout;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      // packs stay inside one sample when kPacked (M % V == 0); else V == 1
      const acc_t step = steps[(j + k) / M];
      pout.v[k] = static_cast<scalar_t>(
          attack::apgd(static_cast<acc_t>(pa.v[k]), static_cast<acc_t>(po_.v[k]),
                       static_cast<acc_t>(pg.v[k]), static_cast<acc_t>(px.v[k]), step, eps, a, b));
    }
    store_pack(out, j, pout);
  }
}

// ---- mim_step --------------------------------------------------------------

// partial[blockIdx.x] = sum of |g| over elements [c*chunk, min(M, (c+1)*chunk)) of sample i,
// blockIdx.x = i * chunks + c.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    abs_sum_partial_kernel(const scalar_t* __restrict__ g, int64_t M, int64_t chunk,
                           int64_t chunks, at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x / chunks;
  const int64_t start = (blockIdx.x % chunks) * chunk;
  const int64_t end = start + chunk < M ? start + chunk : M;
  const scalar_t* gr = g + row * M;
  acc_t s = 0;
  for (int64_t j = start + threadIdx.x; j < end; j += kThreads) {
    s += fabs(static_cast<acc_t>(gr[j]));
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = s;
  }
}

// Block b adds partial[b*per_block, (b+1)*per_block) and writes max(sum / div, tiny) to
// scale[b]: per sample (per_block = chunks, div = M) or for the batch (one block,
// per_block = N * chunks, div = 1).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mim_scale_kernel(const acc_t* __restrict__ partial, int64_t per_block, acc_t div, acc_t tiny,
                     acc_t* __restrict__ scale) {
  const acc_t* p = partial + static_cast<int64_t>(blockIdx.x) * per_block;
  acc_t s = 0;
  for (int64_t k = threadIdx.x; k < per_block; k += kThreads) {
    s += p[k];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const acc_t c = div == acc_t(1) ? s : attack::div_rn(s, div);
    scale[blockIdx.x] = c < tiny ? tiny : c;
  }
}

template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    mim_apply_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x,
                     const scalar_t* __restrict__ g, const scalar_t* __restrict__ mom,
                     const at::opmath_type<scalar_t>* __restrict__ scale, bool per_sample,
                     scalar_t* __restrict__ out, scalar_t* __restrict__ m_out, int64_t M,
                     int64_t total, at::opmath_type<scalar_t> alpha,
                     at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> decay) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride) {
    const auto pa = load_pack<V>(xa, j);
    const auto px = load_pack<V>(x, j);
    const auto pg = load_pack<V>(g, j);
    const auto pm = load_pack<V>(mom, j);
    Pack<scalar_t, V> po, pmo;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t c = scale[per_sample ? (j + k) / M : 0];
      const scalar_t m = static_cast<scalar_t>(attack::mim_momentum(
          static_cast<acc_t>(pg.v[k]), static_cast<acc_t>(pm.v[k]), c, decay));
      pmo.v[k] = m;
      const acc_t xav = static_cast<acc_t>(pa.v[k]), xv = static_cast<acc_t>(px.v[k]);
      po.v[k] = static_cast<scalar_t>(
          per_sample ? attack::mim<true>(xav, xv, static_cast<acc_t>(m), alpha, eps)
                     : attack::mim<false>(xav, xv, static_cast<acc_t>(m), alpha, eps));
    }
    store_pack(out, j, po);
    store_pack(m_out, j, pmo);
  }
}

// ---- square_window ---------------------------------------------------------

// One thread per element of the contiguous (N, C, H, W) output: window pixels get
// clamp(x + step * sign_c, lo, hi) (lo/hi/signs read only there), the rest copy x_best.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    square_window_kernel(const scalar_t* __restrict__ xb, const scalar_t* __restrict__ lo,
                         const scalar_t* __restrict__ hi, const scalar_t* __restrict__ sg,
                         scalar_t* __restrict__ out, int64_t total, int64_t C, int64_t H,
                         int64_t W, int64_t vh, int64_t vw, int64_t s,
                         at::opmath_type<scalar_t> step) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t stride = pack_stride<1>(), j = first_pack<1>(); j < total; j += stride) {
    const int64_t w = j % W;
    const int64_t t = j / W;
    const int64_t h = t % H;
    const scalar_t x = xb[j];
    if (h >= vh && h < vh + s && w >= vw && w < vw + s) {
      const int64_t c = (t / H) % C;
      out[j] = static_cast<scalar_t>(attack::square(static_cast<acc_t>(x),
                                                    static_cast<acc_t>(sg[c]), step,
                                                    static_cast<acc_t>(lo[j]),
                                                    static_cast<acc_t>(hi[j])));
    } else {
      out[j] = x;
    }
  }
}

}  // namespace

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         double alpha, double eps) {
  check_pgd_step(x_adv, x, grad);
  const DeviceScope scope("pgd_step", "x_adv", x_adv);
  const Blocks d = dense_blocks({x_adv, x, grad});
  at::Tensor out = d.new_output();
  if (d.empty()) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "pgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [xa, xs, gs] = d.data<scalar_t, 3>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t total = d.N * d.M;
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    launch_elementwise<scalar_t>(scope, d.M, total, {xa, xs, gs, o}, [&](auto packed, int blocks) {
      pgd_step_kernel<scalar_t, decltype(packed)::value>
          <<<blocks, kThreads, 0, scope.stream>>>(xa, xs, gs, o, total, al, ep);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mim_step_cuda(const at::Tensor& x_adv, const at::Tensor& x,
                                                 const at::Tensor& grad, const at::Tensor& momentum,
                                                 double alpha, double eps, double decay,
                                                 bool per_sample) {
  check_mim_step(x_adv, x, grad, momentum);
  const DeviceScope scope("mim_step", "x_adv", x_adv);
  const Blocks d = dense_blocks({x_adv, x, grad, momentum});
  at::Tensor out = d.new_output();
  at::Tensor m_out = d.new_output();
  if (d.empty()) {
    return {out, m_out};
  }
  const int64_t N = d.N, M = d.M;
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "mim_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [xa, xs, gs, ms] = d.data<scalar_t, 4>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* mo = m_out.mutable_data_ptr<scalar_t>();
    // reduction: partial |g| sums per (sample, chunk), then the scale per sample or batch
    const RowSplit split = split_rows("mim_step", N, M, 1, scope.device);
    const auto acc_opts = x_adv.options().dtype(acc_dtype(x_adv.scalar_type()));
    at::Tensor partial = at::empty({N * split.chunks}, acc_opts);
    at::Tensor scale = at::empty({per_sample ? N : 1}, acc_opts);
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    acc_t* sp = scale.mutable_data_ptr<acc_t>();
    abs_sum_partial_kernel<scalar_t><<<static_cast<unsigned>(N * split.chunks), kThreads, 0,
                                       scope.stream>>>(gs, M, split.chunk, split.chunks, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
    if (per_sample) {
      mim_scale_kernel<acc_t><<<static_cast<unsigned>(N), kThreads, 0, scope.stream>>>(
          pp, split.chunks, static_cast<acc_t>(M), tiny, sp);
    } else {
      mim_scale_kernel<acc_t><<<1, kThreads, 0, scope.stream>>>(pp, N * split.chunks, acc_t(1),
                                                                tiny, sp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = N * M;
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t de = static_cast<acc_t>(decay);
    launch_elementwise<scalar_t>(scope, M, total, {xa, xs, gs, ms, o, mo},
                                 [&](auto packed, int blocks) {
      mim_apply_kernel<scalar_t, decltype(packed)::value><<<blocks, kThreads, 0, scope.stream>>>(
          xa, xs, gs, ms, sp, per_sample, o, mo, M, total, al, ep, de);
    });
  });
  return {out, m_out};
}

at::Tensor apgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                          const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x,
                          double eps, double a) {
  check_apgd_step(x_adv, x_adv_old, grad, step_size, x);
  const DeviceScope scope("apgd_step", "x_adv", x_adv);
  const Blocks d = dense_blocks({x_adv, x_adv_old, grad, x});
  at::Tensor out = d.new_output();
  if (d.empty()) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(x_adv.scalar_type(), "apgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // rounded to x's dtype first, as eager multiplies by step sizes of x's dtype
    const at::Tensor st =
        step_size.to(x_adv.scalar_type()).to(acc_dtype(x_adv.scalar_type())).contiguous();
    const auto [xa, xo, gs, xs] = d.data<scalar_t, 4>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t total = d.N * d.M;
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t aa = static_cast<acc_t>(a);
    const acc_t bb = static_cast<acc_t>(1.0 - a);  // (1 - a) in double, as Python computes it
    const acc_t* sp = st.const_data_ptr<acc_t>();
    launch_elementwise<scalar_t>(scope, d.M, total, {xa, xo, gs, xs, o},
                                 [&](auto packed, int blocks) {
      apgd_step_kernel<scalar_t, decltype(packed)::value><<<blocks, kThreads, 0, scope.stream>>>(
          xa, xo, gs, sp, xs, o, d.M, total, ep, aa, bb);
    });
  });
  return out;
}

at::Tensor square_window_cuda(const at::Tensor& x_best, const at::Tensor& lo,
                              const at::Tensor& hi, const at::Tensor& signs, int64_t vh,
                              int64_t vw, int64_t s, double step) {
  check_square_window(x_best, lo, hi, signs, vh, vw, s);
  const DeviceScope scope("square_window", "x_best", x_best);
  const at::Tensor xb = x_best.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  const at::Tensor sg = signs.contiguous();
  at::Tensor out = at::empty_like(xb);
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  GUARD_FAST_DISPATCH_FLOATING(xb.scalar_type(), "square_window_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    square_window_kernel<scalar_t><<<elementwise_blocks(total, 1, scope.device), kThreads, 0,
                                     scope.stream>>>(
        xb.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        sg.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, xb.size(1),
        xb.size(2), xb.size(3), vh, vw, s, static_cast<acc_t>(step));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace guard_fast
