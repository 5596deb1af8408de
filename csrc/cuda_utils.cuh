// Launch and check helpers shared by the CUDA kernels (ops_cuda.cu,
// attack_steps_cuda.cu).
//
// Elementwise kernels are grid-stride loops over the N*M elements of the
// per-sample blocks (dense_blocks in common.cpp). When M and every pointer
// allow it, elements move in 16-byte packs (4 fp32, 2 fp64, 8 fp16/bf16); a
// pack never straddles two samples then, because M is a multiple of the pack
// width. Reductions give each sample one or more blocks of kThreads threads
// and add within a block with warp shuffles.
//
// Only light c10 headers are included (not ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS/cuSPARSE headers): the kernels compile with the CUDA toolkit alone.
#pragma once

#include "guard_fast.h"

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
namespace gpu {

inline constexpr int kThreads = 256;  // threads per block, a multiple of 32
inline constexpr int kPackBytes = 16;

// Number of SMs of a device, cached (cudaDeviceGetAttribute is cheap but not free).
inline int sm_count(int device) {
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

// Where an op's kernels run: checks that `t` (argument `name` of `op`) is a CUDA
// tensor, makes its device current for the scope and names the device and its
// current stream.
class DeviceScope {
 public:
  DeviceScope(const char* op, const char* name, const at::Tensor& t)
      : guard_(checked_device(op, name, t)),
        device(t.get_device()),
        stream(c10::cuda::getCurrentCUDAStream(device).stream()) {}

 private:
  static at::Device checked_device(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
    return t.device();
  }
  const c10::cuda::CUDAGuard guard_;

 public:
  const int device;
  const cudaStream_t stream;
};

// V elements of T moved as one aligned 16-byte load/store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
constexpr int pack_width() {
  return kPackBytes / static_cast<int>(sizeof(T));
}

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t j) {
  return *reinterpret_cast<const Pack<T, V>*>(p + j);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t j, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p + j) = v;
}

// Packs are usable when every pointer is 16-byte aligned and rows hold a whole
// number of packs (so row starts stay aligned and packs stay inside one row).
// Null pointers (arguments a kernel does not read) do not count.
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

// Grid for the grid-stride elementwise kernels: enough blocks to cover every
// pack once, capped at 8 blocks (2048 threads) per SM.
inline int elementwise_blocks(int64_t total, int V, int device) {
  const int64_t packs = ceil_div(total, V);
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(packs, kThreads), cap)));
}

// Launches an elementwise kernel over `total` elements in rows of M: calls
// launch(packed, blocks), packed a std::true_type / std::false_type telling
// whether every pointer in `ptrs` may move in packs (pass it on as the
// kernel's kPacked: decltype(packed)::value), then checks the launch.
template <typename scalar_t, typename F>
void launch_elementwise(const DeviceScope& scope, int64_t M, int64_t total,
                        std::initializer_list<const void*> ptrs, const F& launch) {
  const bool packed = packs_ok<scalar_t>(M, ptrs);
  const int blocks = elementwise_blocks(total, packed ? pack_width<scalar_t>() : 1, scope.device);
  if (packed) {
    launch(std::true_type{}, blocks);
  } else {
    launch(std::false_type{}, blocks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The grid-stride loop of an elementwise kernel over [0, total) in packs of V
// elements: this thread's first pack starts at first_pack<V>(), the next ones
// pack_stride<V>() further:
//   for (int64_t stride = pack_stride<V>(), j = first_pack<V>(); j < total; j += stride)
// (written out in each kernel: with the body passed as a lambda, nvcc stopped
// unrolling some of these loops).
template <int V>
__device__ __forceinline__ int64_t first_pack() {
  return (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
}

template <int V>
__device__ __forceinline__ int64_t pack_stride() {
  return static_cast<int64_t>(gridDim.x) * kThreads * V;
}

// How a reduction over N samples of M elements splits each sample: `chunks`
// blocks of `chunk` elements (a multiple of V) per sample. Aims for ~4 resident
// blocks per SM, splitting samples only when there are fewer samples than that
// and keeping >= 4 elements of work per thread, so that a single sample still
// fills the GPU.
struct RowSplit {
  int64_t chunks;
  int64_t chunk;
};

inline RowSplit split_rows(const char* op, int64_t N, int64_t M, int V, int device) {
  const int64_t target_blocks = static_cast<int64_t>(sm_count(device)) * 4;
  int64_t chunks = 1;
  if (N < target_blocks) {
    const int64_t min_chunk = static_cast<int64_t>(kThreads) * V * 4;
    chunks = std::max<int64_t>(1, std::min(ceil_div(target_blocks, N), M / min_chunk));
  }
  const int64_t chunk = ceil_div(ceil_div(M, chunks), V) * V;  // whole packs per chunk
  chunks = ceil_div(M, chunk);                                  // drop empty chunks
  TORCH_CHECK(N * chunks <= std::numeric_limits<int32_t>::max(), op,
              ": batch too large for the CUDA reduction grid (N = ", std::to_string(N), ")");
  return {chunks, chunk};
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

}  // namespace gpu
}  // namespace guard_fast
