// FAB's L-inf projection on the CPU: fab_project(t, w, b) -> d.
//
// For each row (t, w: (M, D), b: (M,)): the step d of least L-inf norm with
// <w, t + d> = b and 0 <= t + d <= 1, or, if the box cannot reach the
// hyperplane, every coordinate moved to the bound that moves <w, .> toward b.
// Coordinates with w = 0 do not move. This is what project_linf_box in
// guard_fast/attacks/fab.py (fra31's projection_linf, batched) computes; the
// torch form sorts every row and binary-searches the sorted cumulative sums,
// which on a CPU costs ~20 passes over (M, D) plus an argsort.
//
// Here each row is one task. Orient the row so that r = <w, t> - b >= 0;
// coordinate i can then lower <w, .> by |w_i| * min(lam, p_i), where p_i is its
// room to the box bound in the direction -sign(w_i), so the step is
// d_i = -sign(w_i) min(lam, p_i) with lam solving
//
//     S(lam) = sum_i |w_i| min(lam, p_i) = r,
//
// S concave, piecewise linear and increasing. If r >= S(inf) = sum |w_i| p_i
// the box cannot reach the hyperplane and every coordinate moves fully.
// Otherwise lam is found without sorting: a three-way partition around a
// pivot room tells which side of the pivot lam lies on (quickselect), so the
// rooms below lam are summed into A = sum |w_i| p_i and the weights above into
// B = sum |w_i|, in expected O(D) work, and lam = (r - A) / B. Sums run in
// double. The result equals the torch form's up to rounding (tests compare
// them over random and degenerate rows).
#include "guard_fast.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace guard_fast {
namespace {

void check_fab_project(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK(t.dim() == 2, "fab_project: t must be (M, D), got ", t.sizes());
  TORCH_CHECK(w.sizes() == t.sizes(), "fab_project: w must have t's shape ", t.sizes(),
              ", got ", w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == t.size(0), "fab_project: b must be (",
              t.size(0), ",), got ", b.sizes());
  TORCH_CHECK(t.scalar_type() == w.scalar_type() && t.scalar_type() == b.scalar_type(),
              "fab_project: t, w and b must share a dtype, got ", t.scalar_type(), ", ",
              w.scalar_type(), ", ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fab_project: floating dtypes only, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == w.device() && t.device() == b.device(),
              "fab_project: t, w and b must be on one device");
}

// lam with sum_i a_i min(lam, p_i) = r, given 0 <= r < sum_i a_i p_i; (p, a) in
// `rows` (reordered in place; entries with a_i = 0 are harmless).
double solve_lambda(std::vector<std::pair<double, double>>& rows, double r) {
  double A = 0.0;  // sum a_i p_i over rooms known to lie below lam
  double B = 0.0;  // sum a_i over rooms known to lie above lam
  std::pair<double, double>* lo = rows.data();
  std::pair<double, double>* hi = rows.data() + rows.size();
  while (lo != hi) {
    // pivot: median of the first, middle and last room
    const double p0 = lo->first, p1 = (lo + (hi - lo) / 2)->first, p2 = (hi - 1)->first;
    const double pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));
    // one pass: three-way partition [lo, lt) < pivot, [lt, gt) == pivot, [gt, hi) >
    // (Dijkstra's), summing as it goes
    std::pair<double, double>* lt = lo;
    std::pair<double, double>* it = lo;
    std::pair<double, double>* gt = hi;
    double below = 0.0, equal_a = 0.0, above_a = 0.0;
    while (it < gt) {
      const double p = it->first;
      if (p < pivot) {
        below += it->second * p;
        std::swap(*lt++, *it++);
      } else if (p > pivot) {
        above_a += it->second;
        std::swap(*it, *--gt);
      } else {
        equal_a += it->second;
        ++it;
      }
    }
    const double s_pivot = A + below + pivot * (equal_a + B + above_a);
    if (s_pivot <= r) {  // lam >= pivot: everything up to the pivot is saturated
      A += below + pivot * equal_a;
      lo = gt;
    } else {             // lam < pivot: the pivot and everything above stay linear
      B += equal_a + above_a;
      hi = lt;
    }
  }
  if (B <= 0.0) {
    return std::numeric_limits<double>::infinity();  // only by rounding at r ~ S(inf)
  }
  return std::max((r - A) / B, 0.0);
}

template <typename scalar_t>
void project_rows(const scalar_t* t, const scalar_t* w, const scalar_t* b, scalar_t* d,
                  int64_t M, int64_t D) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<std::pair<double, double>> rows;
    rows.reserve(D);
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* tm = t + m * D;
      const scalar_t* wm = w + m * D;
      scalar_t* dm = d + m * D;
      double dot = 0.0;
      for (int64_t i = 0; i < D; ++i) dot += double(wm[i]) * double(tm[i]);
      const double sgn = (dot - double(b[m]) >= 0.0) ? 1.0 : -1.0;
      const double r = sgn * (dot - double(b[m]));  // >= 0
      // every coordinate enters, w_i = 0 ones with weight 0 (they add nothing to the sums):
      // no data-dependent branches in the per-coordinate loops
      rows.resize(D);
      double cap = 0.0;
      for (int64_t i = 0; i < D; ++i) {
        const double wi = sgn * double(wm[i]);
        const double ti = double(tm[i]);
        const double room = wi < 0.0 ? 1.0 - ti : ti;
        const double a = std::abs(wi);
        rows[i] = {room, a};
        cap += a * room;
      }
      const double lam = (r < cap) ? solve_lambda(rows, r)
                                   : std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < D; ++i) {
        const double wi = sgn * double(wm[i]);
        const double ti = double(tm[i]);
        const double up = std::min(lam, 1.0 - ti);    // w_i < 0: up, at most to 1
        const double down = -std::min(lam, ti);       // w_i > 0: down, at most to 0
        const double di = wi < 0.0 ? up : (wi > 0.0 ? down : 0.0);
        dm[i] = static_cast<scalar_t>(di);
      }
    }
  });
}

}  // namespace

at::Tensor fab_project_cpu(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b) {
  check_fab_project(t, w, b);
  const at::Tensor tc = t.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  at::Tensor d = at::empty_like(tc, at::MemoryFormat::Contiguous);
  if (d.numel() == 0) {
    return d;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tc.scalar_type(), "fab_project_cpu",
                                  [&] {
    project_rows<scalar_t>(tc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                           bc.const_data_ptr<scalar_t>(), d.mutable_data_ptr<scalar_t>(),
                           tc.size(0), tc.size(1));
  });
  return d;
}

at::Tensor fab_project_meta(const at::Tensor& t, const at::Tensor& w, const at::Tensor& b) {
  check_fab_project(t, w, b);
  return at::empty(t.sizes(), t.options());
}

}  // namespace guard_fast
