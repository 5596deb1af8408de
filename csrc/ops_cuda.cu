// CUDA kernels for perturb, sqdiff_norm and sqdiff_norm_backward (launch and
// check helpers in cuda_utils.cuh).
//
//   rowwise_sum_sq_kernel   grid = N * chunks blocks of kThreads threads; block
//                           (i, c) sums d^2 over chunk c of sample i (d = a - b,
//                           or d = a) in acc_t (perturb: double), reduces the block with warp
//                           shuffles and stores (chunks == 1) or atomicAdds
//                           (chunks > 1, into a zeroed buffer) into out[i].
//   perturb_apply_kernel    xp = x + step_i * g, step_i = h / max(||g_i||, tiny)
//   sqdiff_backward_kernel  grad_a = 2 * go_i * (a - b), grad_b = -grad_a
//
// acc_t = at::opmath_type<scalar_t> (float for fp16/bf16/fp32, double for
// fp64).
//
// Split rows (chunks > 1, used only when there are fewer samples than about
// 4 blocks per SM) add their partial sums with atomicAdd, so the last bits of
// those norms can differ between runs; with chunks == 1 results are
// deterministic.
//
// Built without --use_fast_math on purpose: sqrt and the division h / norm
// stay IEEE-rounded so results match the CPU kernels and eager PyTorch.
#include "cuda_utils.cuh"
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace guard_fast {
namespace {

using namespace gpu;

template <typename T>
__device__ __forceinline__ T device_sqrt(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return sqrtf(v);
  } else {
    return sqrt(v);
  }
}

// a, b: N*M scalar_t (b unused unless kDiff). out: (N,) sum_t.
// Block blockIdx.x = i * chunks + c sums d^2 over elements
// [c*chunk, min(M, (c+1)*chunk)) of sample i. chunk is a multiple of the pack
// width when kPacked. sum_t: acc_t for sqdiff_norm (as eager sums), double for
// perturb's norm (the squares of any float, half or bfloat16 neither overflow nor
// underflow in double, as the reference's scaled norm does not).
template <typename scalar_t, typename sum_t, bool kDiff, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    rowwise_sum_sq_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                          int64_t M, int64_t chunk, int64_t chunks, sum_t* __restrict__ out) {
  using acc_t = sum_t;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  using P = Pack<scalar_t, V>;
  const int64_t row = blockIdx.x / chunks;
  const int64_t start = (blockIdx.x % chunks) * chunk;
  const int64_t end = start + chunk < M ? start + chunk : M;
  const scalar_t* ar = a + row * M;
  const scalar_t* br = kDiff ? b + row * M : nullptr;

  acc_t s = 0;
  for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * V; j < end;
       j += static_cast<int64_t>(kThreads) * V) {
    const P pa = *reinterpret_cast<const P*>(ar + j);
    P pb;
    if constexpr (kDiff) {
      pb = *reinterpret_cast<const P*>(br + j);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc_t d = static_cast<acc_t>(pa.v[k]);
      if constexpr (kDiff) {
        d -= static_cast<acc_t>(pb.v[k]);
      }
      s += d * d;
    }
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    if (chunks == 1) {
      out[row] = s;
    } else {
      atomicAdd(out + row, s);
    }
  }
}

// x, g, xp: N*M scalar_t; n64: (N,) norms of g in double; norm: (N,) output.
// xp_i = x_i + step_i * g_i with step_i = h / max(n64_i, tiny), and step_i = 0
// (xp_i = x_i exactly) when n64_i == 0. The thread that owns the first element
// of sample i also writes norm_i = n64_i rounded to acc_t.
template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    perturb_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                         const double* __restrict__ n64,
                         at::opmath_type<scalar_t>* __restrict__ norm,
                         scalar_t* __restrict__ xp, int64_t M, int64_t total, double h,
                         double tiny) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride) {
    const int64_t row = j / M;
    const double nd = n64[row];
    if (j == row * M) {
      norm[row] = static_cast<acc_t>(nd);
    }
    const acc_t step = static_cast<acc_t>(nd > 0.0 ? h / (nd > tiny ? nd : tiny) : 0.0);
    const auto px = load_pack<V>(x, j);
    if (step == acc_t(0)) {
      store_pack(xp, j, px);  // zero gradient (or h == 0): copy x bit for bit
      continue;
    }
    const auto pg = load_pack<V>(g, j);
    Pack<scalar_t, V> po;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      po.v[k] = static_cast<scalar_t>(
          fma(static_cast<acc_t>(pg.v[k]), step, static_cast<acc_t>(px.v[k])));
    }
    store_pack(xp, j, po);
  }
}

// go: (N,) acc_t; a, b, grad_a, grad_b: N*M scalar_t.
// grad_a = 2 * go_i * (a - b), grad_b = -grad_a, both from one read of a and b.
template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    sqdiff_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ go,
                           const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                           scalar_t* __restrict__ grad_a, scalar_t* __restrict__ grad_b,
                           int64_t M, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride) {
    const acc_t c = acc_t(2) * go[j / M];
    const auto pa = load_pack<V>(a, j);
    const auto pb = load_pack<V>(b, j);
    Pack<scalar_t, V> pga, pgb;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t r = (static_cast<acc_t>(pa.v[k]) - static_cast<acc_t>(pb.v[k])) * c;
      pga.v[k] = static_cast<scalar_t>(r);
      pgb.v[k] = static_cast<scalar_t>(-r);
    }
    store_pack(grad_a, j, pga);
    store_pack(grad_b, j, pgb);
  }
}

// out[i] = sum_j d_ij^2 for N samples of M > 0 elements; out is (N,) sum_t on
// the device and is zeroed here when rows are split.
template <typename scalar_t, typename sum_t, bool kDiff>
void rowwise_sum_sq(const char* op, const scalar_t* a, const scalar_t* b, int64_t N, int64_t M,
                    at::Tensor& out, const DeviceScope& scope) {
  using acc_t = sum_t;
  const bool packed = packs_ok<scalar_t>(M, {a, b});
  const RowSplit split = split_rows(op, N, M, packed ? pack_width<scalar_t>() : 1, scope.device);
  if (split.chunks > 1) {
    out.zero_();
  }
  const dim3 grid(static_cast<unsigned>(N * split.chunks));
  acc_t* o = out.mutable_data_ptr<acc_t>();
  if (packed) {
    rowwise_sum_sq_kernel<scalar_t, sum_t, kDiff, true>
        <<<grid, kThreads, 0, scope.stream>>>(a, b, M, split.chunk, split.chunks, o);
  } else {
    rowwise_sum_sq_kernel<scalar_t, sum_t, kDiff, false>
        <<<grid, kThreads, 0, scope.stream>>>(a, b, M, split.chunk, split.chunks, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> perturb_cuda(const at::Tensor& x, const at::Tensor& g,
                                                double h, double tiny) {
  check_pair("perturb", "x", x, "g", g);
  const DeviceScope scope("perturb", "x", x);
  const Blocks d = dense_blocks({x, g});
  at::Tensor xp = d.new_output();
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  if (d.empty()) {
    return {xp, at::zeros({d.N}, acc_opts)};
  }
  at::Tensor norm = at::empty({d.N}, acc_opts);
  at::Tensor ss = at::empty({d.N}, x.options().dtype(at::kDouble));
  GUARD_FAST_DISPATCH_FLOATING(x.scalar_type(), "perturb_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [xs, gs] = d.data<scalar_t, 2>();
    scalar_t* out = xp.mutable_data_ptr<scalar_t>();
    rowwise_sum_sq<scalar_t, double, false>("perturb", gs, nullptr, d.N, d.M, ss, scope);
    at::Tensor n64 = ss.sqrt();
    if constexpr (std::is_same_v<scalar_t, double>) {
      // float64 inputs: rows whose plain sum left float64's range (about 1e+-154) take
      // the scaled norm m * ||g / m||, m the row's largest |g| (ATen on the device,
      // computed for every row so that nothing syncs with the host)
      const at::Tensor a = d.t[1].abs().reshape({d.N, -1});
      const at::Tensor m = at::amax(a, {1});
      const at::Tensor safe = at::where(m > 0, m, at::ones_like(m));  // m may be subnormal
      at::Tensor scaled = m * at::linalg_vector_norm(a / safe.unsqueeze(1), 2,
                                                     at::IntArrayRef{1}, false, std::nullopt);
      scaled = at::where(m.isinf() | (m == 0), m, scaled);
      n64 = at::where((n64 < 1e-150) | n64.isinf(), scaled, n64);
    }
    const int64_t total = d.N * d.M;
    const double* ssp = n64.const_data_ptr<double>();
    acc_t* np = norm.mutable_data_ptr<acc_t>();
    // h and tiny as the float the CPU kernel and eager use, carried in double
    const double h_acc = static_cast<double>(static_cast<acc_t>(h));
    const double tiny_acc = static_cast<double>(static_cast<acc_t>(tiny));
    launch_elementwise<scalar_t>(scope, d.M, total, {xs, gs, out}, [&](auto packed, int blocks) {
      perturb_apply_kernel<scalar_t, decltype(packed)::value>
          <<<blocks, kThreads, 0, scope.stream>>>(xs, gs, ssp, np, out, d.M, total, h_acc,
                                                  tiny_acc);
    });
  });
  return {xp, norm};
}

at::Tensor sqdiff_norm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_pair("sqdiff_norm", "a", a, "b", b);
  const DeviceScope scope("sqdiff_norm", "a", a);
  const Blocks d = dense_blocks({a, b});
  const auto acc_opts = a.options().dtype(acc_dtype(a.scalar_type()));
  if (d.empty()) {
    return at::zeros({d.N}, acc_opts);
  }
  at::Tensor out = at::empty({d.N}, acc_opts);
  GUARD_FAST_DISPATCH_FLOATING(a.scalar_type(), "sqdiff_norm_cuda", [&] {
    const auto [as, bs] = d.data<scalar_t, 2>();
    rowwise_sum_sq<scalar_t, at::opmath_type<scalar_t>, true>("sqdiff_norm", as, bs, d.N, d.M,
                                                               out, scope);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_sqdiff_norm_backward(grad_out, a, b);
  const DeviceScope scope("sqdiff_norm_backward", "a", a);
  const Blocks d = dense_blocks({a, b});
  at::Tensor grad_a = d.new_output();
  at::Tensor grad_b = d.new_output();
  if (d.empty()) {
    return {grad_a, grad_b};
  }
  // N numbers in any float dtype / stride (e.g. expanded from a scalar).
  at::Tensor go = grad_out.to(acc_dtype(a.scalar_type())).contiguous();
  GUARD_FAST_DISPATCH_FLOATING(a.scalar_type(), "sqdiff_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [as, bs] = d.data<scalar_t, 2>();
    scalar_t* ga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    const acc_t* gos = go.const_data_ptr<acc_t>();
    const int64_t total = d.N * d.M;
    launch_elementwise<scalar_t>(scope, d.M, total, {as, bs, ga, gb},
                                 [&](auto packed, int blocks) {
      sqdiff_backward_kernel<scalar_t, decltype(packed)::value>
          <<<blocks, kThreads, 0, scope.stream>>>(gos, as, bs, ga, gb, d.M, total);
    });
  });
  return {grad_a, grad_b};
}

}  // namespace guard_fast
