// CUDA kernels for the attack steps pgd_step, mim_step and apgd_step (math in
// guard_fast.h and kernels/attack_steps.py).
//
//   pgd_step_kernel, apgd_step_kernel, mim_apply_kernel
//       grid-stride elementwise passes over the N*M per-sample blocks (dense_all
//       in common.cpp), moving 16-byte packs when M and the pointers allow it
//       (a pack never straddles two samples then); apgd's step size and mim's
//       scale are looked up per sample at row = j / M.
//   abs_sum_partial_kernel + mim_scale_kernel
//       mim_step's reduction: block (i, c) sums |g| over chunk c of sample i
//       into partial[i * chunks + c] (no atomics, so results are deterministic),
//       then one block per sample (per_sample) or one block for the batch adds
//       the partials and writes c_i = max(sum / M, tiny) or c = max(sum, tiny).
//
// Bit-exactness with eager PyTorch (fp32/fp64): arithmetic goes through the
// __f*_rn / __d*_rn intrinsics, which nvcc never contracts into FMAs (it does
// contract plain a * b + c by default), one IEEE operation each, in eager's order.
//
// Only light c10 headers are included, as in ops_cuda.cu.
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace guard_fast {
namespace {

constexpr int kThreads = 256;  // threads per block, a multiple of 32
constexpr int kPackBytes = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) {
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int pack_width() {
  return kPackBytes / static_cast<int>(sizeof(T));
}

template <typename scalar_t>
bool packs_ok(int64_t M, std::initializer_list<const void*> ptrs) {
  if (M % pack_width<scalar_t>() != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) {
      return false;
    }
  }
  return true;
}

int elementwise_blocks(int64_t total, int V, int device) {
  const int64_t packs = ceil_div(total, V);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(packs, kThreads), cap)));
}

// One IEEE-rounded operation each, never fused into an FMA.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename T>
__device__ __forceinline__ T sign_of(T v) {  // torch.sign: 0 for +-0 and NaN
  return static_cast<T>(static_cast<int>(T(0) < v) - static_cast<int>(v < T(0)));
}

template <typename T>
__device__ __forceinline__ T clamp_to(T v, T lo, T hi) {  // min(max(v, lo), hi), NaN kept
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_totals[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) {
    warp_totals[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_totals[lane] : T(0);
    v = warp_sum(v);
  }
  return v;
}

// ---- pgd_step --------------------------------------------------------------

template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    pgd_step_kernel(const scalar_t* __restrict__ xa, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t total,
                    at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  using P = Pack<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; j < total;
       j += stride) {
    const P pa = *reinterpret_cast<const P*>(xa + j);
    const P px = *reinterpret_cast<const P*>(x + j);
    const P pg = *reinterpret_cast<const P*>(g + j);
    P po;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t xv = static_cast<acc_t>(px.v[k]);
      acc_t v = add_rn(mul_rn(sign_of(static_cast<acc_t>(pg.v[k])), alpha),
                       static_cast<acc_t>(pa.v[k]));
      v = add_rn(clamp_to(sub_rn(v, xv), -eps, eps), xv);
      po.v[k] = static_cast<scalar_t>(clamp_to(v, acc_t(0), acc_t(1)));
    }
    *reinterpret_cast<P*>(out + j) = po;
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
  using P = Pack<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; j < total;
       j += stride) {
    const P pa = *reinterpret_cast<const P*>(xa + j);
    const P po_ = *reinterpret_cast<const P*>(xo + j);
    const P pg = *reinterpret_cast<const P*>(g + j);
    const P px = *reinterpret_cast<const P*>(x + j);
    P pout;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      // packs stay inside one sample when kPacked (M % V == 0); else V == 1
      const acc_t step = steps[(j + k) / M];
      const acc_t xv = static_cast<acc_t>(px.v[k]);
      const acc_t xav = static_cast<acc_t>(pa.v[k]);
      acc_t lo = sub_rn(xv, eps);
      lo = lo < acc_t(0) ? acc_t(0) : lo;
      acc_t hi = add_rn(xv, eps);
      hi = acc_t(1) < hi ? acc_t(1) : hi;
      acc_t z = clamp_to(add_rn(mul_rn(sign_of(static_cast<acc_t>(pg.v[k])), step), xav), lo, hi);
      z = add_rn(mul_rn(sub_rn(z, xav), a), xav);
      z = add_rn(z, mul_rn(sub_rn(xav, static_cast<acc_t>(po_.v[k])), b));
      pout.v[k] = static_cast<scalar_t>(clamp_to(z, lo, hi));
    }
    *reinterpret_cast<P*>(out + j) = pout;
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
    const acc_t c = div == acc_t(1) ? s : div_rn(s, div);
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
  using P = Pack<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; j < total;
       j += stride) {
    const P pa = *reinterpret_cast<const P*>(xa + j);
    const P px = *reinterpret_cast<const P*>(x + j);
    const P pg = *reinterpret_cast<const P*>(g + j);
    const P pm = *reinterpret_cast<const P*>(mom + j);
    P po, pmo;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t c = scale[per_sample ? (j + k) / M : 0];
      const scalar_t m = static_cast<scalar_t>(
          add_rn(div_rn(static_cast<acc_t>(pg.v[k]), c), mul_rn(static_cast<acc_t>(pm.v[k]), decay)));
      pmo.v[k] = m;
      const acc_t xv = static_cast<acc_t>(px.v[k]);
      acc_t v = add_rn(mul_rn(sign_of(static_cast<acc_t>(m)), alpha), static_cast<acc_t>(pa.v[k]));
      if (per_sample) {
        v = add_rn(clamp_to(sub_rn(v, xv), -eps, eps), xv);
      } else {
        v = clamp_to(v, sub_rn(xv, eps), add_rn(xv, eps));
      }
      po.v[k] = static_cast<scalar_t>(clamp_to(v, acc_t(0), acc_t(1)));
    }
    *reinterpret_cast<P*>(out + j) = po;
    *reinterpret_cast<P*>(m_out + j) = pmo;
  }
}

}  // namespace

at::Tensor pgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         double alpha, double eps) {
  check_pair("pgd_step", "x_adv", x_adv, "x", x);
  check_pair("pgd_step", "x_adv", x_adv, "grad", grad);
  TORCH_CHECK(x_adv.is_cuda(), "pgd_step: x_adv must be a CUDA tensor here, got ", x_adv.device());
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const std::vector<at::Tensor> d = dense_all({x_adv, x, grad});
  at::Tensor out = empty_same_layout(d[0]);
  const int64_t total = out.numel();
  const int64_t N = x_adv.size(0);
  if (total == 0) {
    return out;
  }
  const int device = x_adv.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_adv.scalar_type(), "pgd_step_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xa = d[0].const_data_ptr<scalar_t>();
    const scalar_t* xs = d[1].const_data_ptr<scalar_t>();
    const scalar_t* gs = d[2].const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const bool packed = packs_ok<scalar_t>(total / N, {xa, xs, gs, o});
    const int V = packed ? pack_width<scalar_t>() : 1;
    const int blocks = elementwise_blocks(total, V, device);
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    if (packed) {
      pgd_step_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(xa, xs, gs, o, total, al, ep);
    } else {
      pgd_step_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(xa, xs, gs, o, total, al, ep);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mim_step_cuda(const at::Tensor& x_adv, const at::Tensor& x,
                                                 const at::Tensor& grad, const at::Tensor& momentum,
                                                 double alpha, double eps, double decay,
                                                 bool per_sample) {
  check_pair("mim_step", "x_adv", x_adv, "x", x);
  check_pair("mim_step", "x_adv", x_adv, "grad", grad);
  check_pair("mim_step", "x_adv", x_adv, "momentum", momentum);
  TORCH_CHECK(x_adv.is_cuda(), "mim_step: x_adv must be a CUDA tensor here, got ", x_adv.device());
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const std::vector<at::Tensor> d = dense_all({x_adv, x, grad, momentum});
  at::Tensor out = empty_same_layout(d[0]);
  at::Tensor m_out = empty_same_layout(d[0]);
  const int64_t N = x_adv.size(0);
  const int64_t M = N > 0 ? out.numel() / N : 0;
  if (N == 0 || M == 0) {
    return {out, m_out};
  }
  const int device = x_adv.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_adv.scalar_type(), "mim_step_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xa = d[0].const_data_ptr<scalar_t>();
    const scalar_t* xs = d[1].const_data_ptr<scalar_t>();
    const scalar_t* gs = d[2].const_data_ptr<scalar_t>();
    const scalar_t* ms = d[3].const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* mo = m_out.mutable_data_ptr<scalar_t>();
    // reduction: ~4 blocks per SM, chunks of >= 4 elements per thread
    const int64_t target_blocks = static_cast<int64_t>(sm_count(device)) * 4;
    int64_t chunks = 1;
    if (N < target_blocks) {
      chunks = std::max<int64_t>(1, std::min(ceil_div(target_blocks, N), M / (kThreads * 4)));
    }
    const int64_t chunk = ceil_div(M, chunks);
    chunks = ceil_div(M, chunk);
    TORCH_CHECK(N * chunks <= std::numeric_limits<int32_t>::max(),
                "mim_step: batch too large for the CUDA reduction grid (N = ", std::to_string(N),
                ")");
    const auto acc_opts = x_adv.options().dtype(acc_dtype(x_adv.scalar_type()));
    at::Tensor partial = at::empty({N * chunks}, acc_opts);
    at::Tensor scale = at::empty({per_sample ? N : 1}, acc_opts);
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    acc_t* sp = scale.mutable_data_ptr<acc_t>();
    abs_sum_partial_kernel<scalar_t>
        <<<static_cast<unsigned>(N * chunks), kThreads, 0, stream>>>(gs, M, chunk, chunks, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
    if (per_sample) {
      mim_scale_kernel<acc_t><<<static_cast<unsigned>(N), kThreads, 0, stream>>>(
          pp, chunks, static_cast<acc_t>(M), tiny, sp);
    } else {
      mim_scale_kernel<acc_t><<<1, kThreads, 0, stream>>>(pp, N * chunks, acc_t(1), tiny, sp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = N * M;
    const bool packed = packs_ok<scalar_t>(M, {xa, xs, gs, ms, o, mo});
    const int V = packed ? pack_width<scalar_t>() : 1;
    const int blocks = elementwise_blocks(total, V, device);
    const acc_t al = static_cast<acc_t>(alpha);
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t de = static_cast<acc_t>(decay);
    if (packed) {
      mim_apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          xa, xs, gs, ms, sp, per_sample, o, mo, M, total, al, ep, de);
    } else {
      mim_apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          xa, xs, gs, ms, sp, per_sample, o, mo, M, total, al, ep, de);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, m_out};
}

at::Tensor apgd_step_cuda(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                          const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x,
                          double eps, double a) {
  check_pair("apgd_step", "x_adv", x_adv, "x_adv_old", x_adv_old);
  check_pair("apgd_step", "x_adv", x_adv, "grad", grad);
  check_pair("apgd_step", "x_adv", x_adv, "x", x);
  check_step_size(step_size, x_adv);
  TORCH_CHECK(x_adv.is_cuda(), "apgd_step: x_adv must be a CUDA tensor here, got ", x_adv.device());
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const std::vector<at::Tensor> d = dense_all({x_adv, x_adv_old, grad, x});
  at::Tensor out = empty_same_layout(d[0]);
  const int64_t N = x_adv.size(0);
  const int64_t M = N > 0 ? out.numel() / N : 0;
  if (N == 0 || M == 0) {
    return out;
  }
  const int device = x_adv.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_adv.scalar_type(), "apgd_step_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // rounded to x's dtype first, as eager multiplies by step sizes of x's dtype
    const at::Tensor st =
        step_size.to(x_adv.scalar_type()).to(acc_dtype(x_adv.scalar_type())).contiguous();
    const scalar_t* xa = d[0].const_data_ptr<scalar_t>();
    const scalar_t* xo = d[1].const_data_ptr<scalar_t>();
    const scalar_t* gs = d[2].const_data_ptr<scalar_t>();
    const scalar_t* xs = d[3].const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t total = N * M;
    const bool packed = packs_ok<scalar_t>(M, {xa, xo, gs, xs, o});
    const int V = packed ? pack_width<scalar_t>() : 1;
    const int blocks = elementwise_blocks(total, V, device);
    const acc_t ep = static_cast<acc_t>(eps);
    const acc_t aa = static_cast<acc_t>(a);
    const acc_t bb = static_cast<acc_t>(1.0 - a);  // (1 - a) in double, as Python computes it
    const acc_t* sp = st.const_data_ptr<acc_t>();
    if (packed) {
      apgd_step_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          xa, xo, gs, sp, xs, o, M, total, ep, aa, bb);
    } else {
      apgd_step_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          xa, xo, gs, sp, xs, o, M, total, ep, aa, bb);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

namespace {

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
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < total;
       j += stride) {
    const int64_t w = j % W;
    const int64_t t = j / W;
    const int64_t h = t % H;
    const scalar_t x = xb[j];
    if (h >= vh && h < vh + s && w >= vw && w < vw + s) {
      const int64_t c = (t / H) % C;
      const acc_t d = mul_rn(static_cast<acc_t>(sg[c]), step);
      out[j] = static_cast<scalar_t>(clamp_to(add_rn(static_cast<acc_t>(x), d),
                                              static_cast<acc_t>(lo[j]),
                                              static_cast<acc_t>(hi[j])));
    } else {
      out[j] = x;
    }
  }
}

}  // namespace

at::Tensor square_window_cuda(const at::Tensor& x_best, const at::Tensor& lo,
                              const at::Tensor& hi, const at::Tensor& signs, int64_t vh,
                              int64_t vw, int64_t s, double step) {
  check_square_window(x_best, lo, hi, signs, vh, vw, s);
  TORCH_CHECK(x_best.is_cuda(), "square_window: x_best must be a CUDA tensor here, got ",
              x_best.device());
  const c10::cuda::CUDAGuard guard(x_best.device());
  const at::Tensor xb = x_best.contiguous(), l = lo.contiguous(), h = hi.contiguous();
  const at::Tensor sg = signs.contiguous();
  at::Tensor out = at::empty_like(xb);
  const int64_t total = out.numel();
  if (total == 0) {
    return out;
  }
  const int device = x_best.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xb.scalar_type(), "square_window_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int blocks = elementwise_blocks(total, 1, device);
    square_window_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        xb.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        sg.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, xb.size(1),
        xb.size(2), xb.size(3), vh, vw, s, static_cast<acc_t>(step));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace guard_fast
