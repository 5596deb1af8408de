// Work splitting shared by the CPU kernels (ops_cpu.cpp, attack_steps_cpu.cpp).
//
// Inputs arrive as raw per-sample blocks (dense_all in common.cpp): sample i is
// elements [i*M, (i+1)*M) of every buffer. Work is split with at::parallel_for:
//   * reductions (one sum per sample): over samples when there are at least as
//     many samples as threads, otherwise each sample is cut into chunks
//     (>= kMinChunk elements) whose partial sums are added afterwards, in chunk
//     order, so a batch of one 3x224x224 image still uses every thread (and the
//     sums do not depend on how the threads are scheduled);
//   * elementwise passes: over the flat range [0, N*M), each thread walking
//     the row segments its range covers.
#pragma once

#include "guard_fast.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace guard_fast {
namespace cpu {

// Elements per parallel task in elementwise passes (ATen's own default).
inline constexpr int64_t kGrain = 32768;
// Smallest chunk of one sample given to a thread in a split reduction.
inline constexpr int64_t kMinChunk = 8192;
// Reductions restart their accumulators every kCascade elements and add the
// block sum into an outer accumulator: a two-level (cascade) sum whose rounding
// error grows with kCascade + M / kCascade instead of M.
inline constexpr int64_t kCascade = 4096;

// out[i] = the sum over sample i of N samples of M elements, where
// piece_sum(start, len) returns the sum over the flat elements [start, start + len)
// (always inside one sample).
template <typename acc_t, typename F>
void rowwise_reduce(int64_t N, int64_t M, acc_t* out, const F& piece_sum) {
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (N < threads) {
    chunks = std::max<int64_t>(1, std::min(ceil_div(threads, N), M / kMinChunk));
  }
  if (chunks == 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = piece_sum(i * M, M);
      }
    });
    return;
  }
  // Two-level reduction: task t = i * chunks + c sums chunk c of sample i.
  const int64_t chunk = ceil_div(M, chunks);
  chunks = ceil_div(M, chunk);  // drop chunks that would be empty
  std::vector<acc_t> partial(N * chunks);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / chunks;
      const int64_t start = i * M + (t % chunks) * chunk;
      partial[t] = piece_sum(start, std::min(chunk, (i + 1) * M - start));
    }
  });
  for (int64_t i = 0; i < N; ++i) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      s += partial[i * chunks + c];
    }
    out[i] = s;
  }
}

// Calls f(i, offset, len) for every maximal run of elements of one sample i in
// the flat range [0, N*M), in parallel. Requires M > 0.
template <typename F>
void for_each_row_segment(int64_t N, int64_t M, const F& f) {
  at::parallel_for(0, N * M, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin / M;
    int64_t pos = begin;
    while (pos < end) {
      const int64_t stop = std::min(end, (i + 1) * M);
      f(i, pos, stop - pos);
      pos = stop;
      ++i;
    }
  });
}

}  // namespace cpu
}  // namespace guard_fast
