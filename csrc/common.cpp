// Validation, layout planning and Meta (shape-only) kernels shared by the CPU
// and CUDA implementations. Everything here uses the sym_* accessors so that it
// also runs under FakeTensor / torch.compile with dynamic shapes: the Meta
// kernels must pick exactly the output strides the real kernels pick.
#include "guard_fast.h"

#include <ATen/ATen.h>

#include <string>

namespace guard_fast {

namespace {

bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// "[2, 3, 5]" for error messages, built with std::to_string only. Streaming integers
// into a std::ostream from this library (e.g. a SymIntArrayRef or an int64_t inside
// TORCH_CHECK) segfaulted on the GPU machine (torch 2.11, gcc 13; the crash was in
// std::ostream::_M_insert<long> instantiated in the extension), so messages here pass
// TORCH_CHECK only strings and ScalarType/Device values (whose operator<< live in c10).
std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) {
      out += ", ";
    }
    const c10::SymInt& s = t.sym_size(d);
    auto v = s.maybe_as_int();
    out += v ? std::to_string(*v) : std::string("s?");
  }
  return out + "]";
}

}  // namespace

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_pair(const char* op, const char* an, const at::Tensor& a,
                const char* bn, const at::Tensor& b) {
  TORCH_CHECK(a.defined() && b.defined(), op, ": ", an, " and ", bn, " must be defined tensors");
  TORCH_CHECK(supported_float(a.scalar_type()), op, ": ", an,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": dtype mismatch, ", an, " is ",
              a.scalar_type(), " but ", bn, " is ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": device mismatch, ", an, " is on ", a.device(),
              " but ", bn, " is on ", b.device());
  TORCH_CHECK(a.dim() >= 1, op, ": ", an,
              " must have at least 1 dimension (the batch dimension N), got a 0-dim tensor");
  TORCH_CHECK(a.sym_sizes().equals(b.sym_sizes()), op, ": shape mismatch, ", an, " has shape ",
              shape_str(a), " but ", bn, " has shape ", shape_str(b));
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& a) {
  const char* op = "sqdiff_norm_backward";
  TORCH_CHECK(grad_out.defined(), op, ": grad_out must be a defined tensor");
  TORCH_CHECK(supported_float(grad_out.scalar_type()), op,
              ": grad_out must be a floating-point tensor (float32, float64, bfloat16 or "
              "float16), got ",
              grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == a.device(), op, ": device mismatch, grad_out is on ",
              grad_out.device(), " but a is on ", a.device());
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.sym_size(0) == a.sym_size(0), op,
              ": grad_out must have shape (N,) with N = a.size(0), a has shape ", shape_str(a),
              " but grad_out has shape ", shape_str(grad_out));
}

bool batch_dense(const at::Tensor& t) {
  if (t.dim() == 0 || !t.is_non_overlapping_and_dense()) {
    return false;
  }
  if (t.sym_size(0) == 1) {
    return true;  // one sample: any dense order is one block
  }
  // A non-overlapping dense tensor is a mixed-radix numbering of [0, numel):
  // sorted by stride, each size>1 dim's stride is the product of the sizes of
  // the dims below it. stride(0) == M = prod(sizes[1:]) therefore means all other
  // dims live below the batch dim, i.e. sample i is the block [i*M, (i+1)*M).
  c10::SymInt m = 1;
  for (int64_t d = 1; d < t.dim(); ++d) {
    m = m * t.sym_size(d);
  }
  return t.sym_stride(0) == m;
}

std::pair<at::Tensor, at::Tensor> dense_pair(const at::Tensor& a, const at::Tensor& b) {
  if (a.sym_strides().equals(b.sym_strides()) && batch_dense(a)) {
    return {a, b};
  }
  return {a.contiguous(), b.contiguous()};
}

std::vector<at::Tensor> dense_all(at::TensorList ts) {
  bool same = !ts.empty() && batch_dense(ts[0]);
  for (size_t k = 1; same && k < ts.size(); ++k) {
    same = ts[k].sym_strides().equals(ts[0].sym_strides());
  }
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    out.push_back(same ? t : t.contiguous());
  }
  return out;
}

void check_step_size(const at::Tensor& step_size, const at::Tensor& x) {
  const char* op = "apgd_step";
  TORCH_CHECK(step_size.defined(), op, ": step_size must be a defined tensor");
  TORCH_CHECK(supported_float(step_size.scalar_type()), op,
              ": step_size must be a floating-point tensor, got ", step_size.scalar_type());
  TORCH_CHECK(step_size.device() == x.device(), op, ": device mismatch, step_size is on ",
              step_size.device(), " but x_adv is on ", x.device());
  TORCH_CHECK(step_size.dim() == 1 && step_size.sym_size(0) == x.sym_size(0), op,
              ": step_size must have shape (N,) with N = x_adv.size(0), x_adv has shape ",
              shape_str(x), " but step_size has shape ", shape_str(step_size));
}

at::Tensor empty_same_layout(const at::Tensor& t) {
  return at::empty_strided_symint(t.sym_sizes(), t.sym_strides(), t.options());
}

// ---- Meta kernels: shapes, dtypes and strides only -------------------------
// Registered for DispatchKey::Meta, which FakeTensor (torch.compile, opcheck)
// uses when no Python fake impl exists. They mirror the real kernels' choices.

std::tuple<at::Tensor, at::Tensor> perturb_meta(const at::Tensor& x, const at::Tensor& g,
                                                double /*h*/, double /*tiny*/) {
  check_pair("perturb", "x", x, "g", g);
  auto [xd, gd] = dense_pair(x, g);
  at::Tensor xp = empty_same_layout(xd);
  at::Tensor norm =
      at::empty_symint({x.sym_size(0)}, x.options().dtype(acc_dtype(x.scalar_type())));
  return {xp, norm};
}

at::Tensor sqdiff_norm_meta(const at::Tensor& a, const at::Tensor& b) {
  check_pair("sqdiff_norm", "a", a, "b", b);
  return at::empty_symint({a.sym_size(0)}, a.options().dtype(acc_dtype(a.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_meta(const at::Tensor& grad_out,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_pair("sqdiff_norm_backward", "a", a, "b", b);
  check_grad_out(grad_out, a);
  auto [ad, bd] = dense_pair(a, b);
  return {empty_same_layout(ad), empty_same_layout(ad)};
}

// Attack steps: every tensor argument has x_adv's shape, dtype and device; the
// outputs follow dense_all's layout (x_adv's strides or contiguous).

at::Tensor pgd_step_meta(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         double /*alpha*/, double /*eps*/) {
  check_pair("pgd_step", "x_adv", x_adv, "x", x);
  check_pair("pgd_step", "x_adv", x_adv, "grad", grad);
  return empty_same_layout(dense_all({x_adv, x, grad})[0]);
}

std::tuple<at::Tensor, at::Tensor> mim_step_meta(const at::Tensor& x_adv, const at::Tensor& x,
                                                 const at::Tensor& grad, const at::Tensor& momentum,
                                                 double /*alpha*/, double /*eps*/,
                                                 double /*decay*/, bool /*per_sample*/) {
  check_pair("mim_step", "x_adv", x_adv, "x", x);
  check_pair("mim_step", "x_adv", x_adv, "grad", grad);
  check_pair("mim_step", "x_adv", x_adv, "momentum", momentum);
  const at::Tensor d = dense_all({x_adv, x, grad, momentum})[0];
  return {empty_same_layout(d), empty_same_layout(d)};
}

at::Tensor apgd_step_meta(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                          const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x,
                          double /*eps*/, double /*a*/) {
  check_pair("apgd_step", "x_adv", x_adv, "x_adv_old", x_adv_old);
  check_pair("apgd_step", "x_adv", x_adv, "grad", grad);
  check_pair("apgd_step", "x_adv", x_adv, "x", x);
  check_step_size(step_size, x_adv);
  return empty_same_layout(dense_all({x_adv, x_adv_old, grad, x})[0]);
}

void check_square_window(const at::Tensor& x_best, const at::Tensor& lo, const at::Tensor& hi,
                         const at::Tensor& signs, int64_t vh, int64_t vw, int64_t s) {
  check_pair("square_window", "x_best", x_best, "lo", lo);
  check_pair("square_window", "x_best", x_best, "hi", hi);
  TORCH_CHECK(x_best.dim() == 4, "square_window: x_best must be (N, C, H, W), got ",
              x_best.sizes());
  const int64_t C = x_best.size(1), H = x_best.size(2), W = x_best.size(3);
  TORCH_CHECK(signs.numel() == C && signs.scalar_type() == x_best.scalar_type() &&
                  signs.device() == x_best.device(),
              "square_window: signs must hold ", C, " values of x_best's dtype and device, got ",
              signs.numel(), " ", signs.scalar_type(), " values on ", signs.device());
  TORCH_CHECK(s >= 1 && vh >= 0 && vw >= 0 && vh + s <= H && vw + s <= W,
              "square_window: the window at (", vh, ", ", vw, ") of side ", s,
              " does not fit images of ", H, " x ", W);
}

at::Tensor square_window_meta(const at::Tensor& x_best, const at::Tensor& lo,
                              const at::Tensor& hi, const at::Tensor& signs, int64_t vh,
                              int64_t vw, int64_t s, double /*step*/) {
  check_square_window(x_best, lo, hi, signs, vh, vw, s);
  return at::empty(x_best.sizes(), x_best.options());
}

}  // namespace guard_fast
