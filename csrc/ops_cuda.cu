// CUDA kernels for perturb, sqdiff_norm and sqdiff_norm_backward.
//
// All three ops see their inputs as raw per-sample blocks (dense_pair in
// common.cpp): sample i is elements [i*M, (i+1)*M) of every buffer.
//
//   rowwise_sum_sq_kernel   grid = N * chunks blocks of kThreads threads; block
//                           (i, c) sums d^2 over chunk c of sample i (d = a - b,
//                           or d = a) in acc_t, reduces the block with warp
//                           shuffles and stores (chunks == 1) or atomicAdds
//                           (chunks > 1, into a zeroed buffer) into out[i].
//   perturb_apply_kernel    xp = x + step_i * g, step_i = h / max(||g_i||, tiny)
//   sqdiff_backward_kernel  grad_a = 2 * go_i * (a - b), grad_b = -grad_a
//
// acc_t = at::opmath_type<scalar_t> (float for fp16/bf16/fp32, double for
// fp64). When M and every pointer allow it, elements move in 16-byte packs
// (4 fp32, 2 fp64, 8 fp16/bf16); packs never straddle two samples because M is
// then a multiple of the pack width.
//
// Split rows (chunks > 1, used only when there are fewer samples than about
// 4 blocks per SM) add their partial sums with atomicAdd, so the last bits of
// those norms can differ between runs; with chunks == 1 results are
// deterministic.
//
// Built without --use_fast_math on purpose: sqrt and the division h / norm
// stay IEEE-rounded so results match the CPU kernels and eager PyTorch.
//
// Only light c10 headers are included (not ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS/cuSPARSE headers): this file compiles with the CUDA toolkit alone.
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

namespace guard_fast {
namespace {

constexpr int kThreads = 256;  // threads per block, a multiple of 32
constexpr int kPackBytes = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of SMs of a device, cached (cudaDeviceGetAttribute is cheap but not free).
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

// V elements of T moved as one aligned 16-byte load/store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int pack_width() {
  return kPackBytes / static_cast<int>(sizeof(T));
}

// Packs are usable when every pointer is 16-byte aligned and rows hold a whole
// number of packs (so row starts stay aligned and packs stay inside one row).
template <typename scalar_t>
bool packs_ok(int64_t M, std::initializer_list<const void*> ptrs) {
  if (M % pack_width<scalar_t>() != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) {
      return false;
    }
  }
  return true;
}

template <typename T>
__device__ __forceinline__ T device_sqrt(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return sqrtf(v);
  } else {
    return sqrt(v);
  }
}

// Sum over the 32 lanes of a warp (result valid in lane 0).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over a block of kThreads threads (result valid in thread 0).
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

// a, b: N*M scalar_t (b unused unless kDiff). out: (N,) acc_t.
// Block blockIdx.x = i * chunks + c sums d^2 over elements
// [c*chunk, min(M, (c+1)*chunk)) of sample i. chunk is a multiple of the pack
// width when kPacked.
template <typename scalar_t, bool kDiff, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    rowwise_sum_sq_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                          int64_t M, int64_t chunk, int64_t chunks,
                          at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
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

// x, g, xp: N*M scalar_t; ss: (N,) sums of squares of g; norm: (N,) output.
// xp_i = x_i + step_i * g_i with step_i = h / max(sqrt(ss_i), tiny), and
// step_i = 0 (xp_i = x_i exactly) when ss_i == 0. The thread that owns the
// first element of sample i also writes norm_i = sqrt(ss_i).
template <typename scalar_t, bool kPacked>
__global__ void __launch_bounds__(kThreads)
    perturb_apply_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                         const at::opmath_type<scalar_t>* __restrict__ ss,
                         at::opmath_type<scalar_t>* __restrict__ norm,
                         scalar_t* __restrict__ xp, int64_t M, int64_t total,
                         at::opmath_type<scalar_t> h, at::opmath_type<scalar_t> tiny) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kPacked ? pack_width<scalar_t>() : 1;
  using P = Pack<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; j < total;
       j += stride) {
    const int64_t row = j / M;
    const acc_t n = device_sqrt(ss[row]);
    if (j == row * M) {
      norm[row] = n;
    }
    const acc_t step = n > acc_t(0) ? h / (n > tiny ? n : tiny) : acc_t(0);
    const P px = *reinterpret_cast<const P*>(x + j);
    if (step == acc_t(0)) {
      *reinterpret_cast<P*>(xp + j) = px;  // zero gradient (or h == 0): copy x bit for bit
      continue;
    }
    const P pg = *reinterpret_cast<const P*>(g + j);
    P po;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      po.v[k] = static_cast<scalar_t>(
          fma(static_cast<acc_t>(pg.v[k]), step, static_cast<acc_t>(px.v[k])));
    }
    *reinterpret_cast<P*>(xp + j) = po;
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
  using P = Pack<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; j < total;
       j += stride) {
    const acc_t c = acc_t(2) * go[j / M];
    const P pa = *reinterpret_cast<const P*>(a + j);
    const P pb = *reinterpret_cast<const P*>(b + j);
    P pga, pgb;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t r = (static_cast<acc_t>(pa.v[k]) - static_cast<acc_t>(pb.v[k])) * c;
      pga.v[k] = static_cast<scalar_t>(r);
      pgb.v[k] = static_cast<scalar_t>(-r);
    }
    *reinterpret_cast<P*>(grad_a + j) = pga;
    *reinterpret_cast<P*>(grad_b + j) = pgb;
  }
}

// Grid for the grid-stride elementwise kernels: enough blocks to cover every
// pack once, capped at 8 blocks (2048 threads) per SM.
int elementwise_blocks(int64_t total, int V, int device) {
  const int64_t packs = ceil_div(total, V);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(packs, kThreads), cap)));
}

// out[i] = sum_j d_ij^2 for N samples of M > 0 elements; out is (N,) acc_t on
// the device and is zeroed here when rows are split.
template <typename scalar_t, bool kDiff>
void rowwise_sum_sq(const scalar_t* a, const scalar_t* b, int64_t N, int64_t M,
                    at::Tensor& out, int device, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool packed = packs_ok<scalar_t>(M, {a, b});
  const int V = packed ? pack_width<scalar_t>() : 1;
  // Aim for ~4 resident blocks per SM; split samples into chunks only when
  // there are fewer samples than that, keeping >= 4 packs per thread.
  const int64_t target_blocks = static_cast<int64_t>(sm_count(device)) * 4;
  int64_t chunks = 1;
  if (N < target_blocks) {
    const int64_t min_chunk = static_cast<int64_t>(kThreads) * V * 4;
    chunks = std::max<int64_t>(1, std::min(ceil_div(target_blocks, N), M / min_chunk));
  }
  int64_t chunk = ceil_div(ceil_div(M, chunks), V) * V;  // whole packs per chunk
  chunks = ceil_div(M, chunk);
  TORCH_CHECK(N * chunks <= std::numeric_limits<int32_t>::max(),
              "guard_fast: batch too large for the CUDA reduction grid (N = ", std::to_string(N),
              ")");
  if (chunks > 1) {
    out.zero_();
  }
  const dim3 grid(static_cast<unsigned>(N * chunks));
  acc_t* o = out.mutable_data_ptr<acc_t>();
  if (packed) {
    rowwise_sum_sq_kernel<scalar_t, kDiff, true>
        <<<grid, kThreads, 0, stream>>>(a, b, M, chunk, chunks, o);
  } else {
    rowwise_sum_sq_kernel<scalar_t, kDiff, false>
        <<<grid, kThreads, 0, stream>>>(a, b, M, chunk, chunks, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> perturb_cuda(const at::Tensor& x, const at::Tensor& g,
                                                double h, double tiny) {
  check_pair("perturb", "x", x, "g", g);
  TORCH_CHECK(x.is_cuda(), "perturb: x must be a CUDA tensor here, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto [xd, gd] = dense_pair(x, g);
  const int64_t N = x.size(0);
  const int64_t M = N > 0 ? xd.numel() / N : 0;
  at::Tensor xp = empty_same_layout(xd);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  if (N == 0 || M == 0) {
    return {xp, at::zeros({N}, acc_opts)};
  }
  at::Tensor norm = at::empty({N}, acc_opts);
  at::Tensor ss = at::empty({N}, acc_opts);
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "perturb_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = xd.const_data_ptr<scalar_t>();
    const scalar_t* gs = gd.const_data_ptr<scalar_t>();
    scalar_t* out = xp.mutable_data_ptr<scalar_t>();
    rowwise_sum_sq<scalar_t, false>(gs, nullptr, N, M, ss, device, stream);
    const int64_t total = N * M;
    const bool packed = packs_ok<scalar_t>(M, {xs, gs, out});
    const int V = packed ? pack_width<scalar_t>() : 1;
    const int blocks = elementwise_blocks(total, V, device);
    const acc_t* ssp = ss.const_data_ptr<acc_t>();
    acc_t* np = norm.mutable_data_ptr<acc_t>();
    const acc_t h_acc = static_cast<acc_t>(h);
    const acc_t tiny_acc = static_cast<acc_t>(tiny);
    if (packed) {
      perturb_apply_kernel<scalar_t, true>
          <<<blocks, kThreads, 0, stream>>>(xs, gs, ssp, np, out, M, total, h_acc, tiny_acc);
    } else {
      perturb_apply_kernel<scalar_t, false>
          <<<blocks, kThreads, 0, stream>>>(xs, gs, ssp, np, out, M, total, h_acc, tiny_acc);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {xp, norm};
}

at::Tensor sqdiff_norm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_pair("sqdiff_norm", "a", a, "b", b);
  TORCH_CHECK(a.is_cuda(), "sqdiff_norm: a must be a CUDA tensor here, got ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  auto [ad, bd] = dense_pair(a, b);
  const int64_t N = a.size(0);
  const int64_t M = N > 0 ? ad.numel() / N : 0;
  const auto acc_opts = a.options().dtype(acc_dtype(a.scalar_type()));
  if (N == 0 || M == 0) {
    return at::zeros({N}, acc_opts);
  }
  at::Tensor out = at::empty({N}, acc_opts);
  const int device = a.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sqdiff_norm_cuda",
                                  [&] {
                                    rowwise_sum_sq<scalar_t, true>(
                                        ad.const_data_ptr<scalar_t>(),
                                        bd.const_data_ptr<scalar_t>(), N, M, out, device,
                                        stream);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_pair("sqdiff_norm_backward", "a", a, "b", b);
  check_grad_out(grad_out, a);
  TORCH_CHECK(a.is_cuda(), "sqdiff_norm_backward: a must be a CUDA tensor here, got ",
              a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  auto [ad, bd] = dense_pair(a, b);
  const int64_t N = a.size(0);
  const int64_t M = N > 0 ? ad.numel() / N : 0;
  at::Tensor grad_a = empty_same_layout(ad);
  at::Tensor grad_b = empty_same_layout(ad);
  if (N == 0 || M == 0) {
    return {grad_a, grad_b};
  }
  // N numbers in any float dtype / stride (e.g. expanded from a scalar).
  at::Tensor go = grad_out.to(acc_dtype(a.scalar_type())).contiguous();
  const int device = a.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.scalar_type(), "sqdiff_norm_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* as = ad.const_data_ptr<scalar_t>();
        const scalar_t* bs = bd.const_data_ptr<scalar_t>();
        scalar_t* ga = grad_a.mutable_data_ptr<scalar_t>();
        scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
        const acc_t* gos = go.const_data_ptr<acc_t>();
        const int64_t total = N * M;
        const bool packed = packs_ok<scalar_t>(M, {as, bs, ga, gb});
        const int V = packed ? pack_width<scalar_t>() : 1;
        const int blocks = elementwise_blocks(total, V, device);
        if (packed) {
          sqdiff_backward_kernel<scalar_t, true>
              <<<blocks, kThreads, 0, stream>>>(gos, as, bs, ga, gb, M, total);
        } else {
          sqdiff_backward_kernel<scalar_t, false>
              <<<blocks, kThreads, 0, stream>>>(gos, as, bs, ga, gb, M, total);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_a, grad_b};
}

}  // namespace guard_fast
