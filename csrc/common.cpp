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

// t holds one value per sample of x: floating, shape (N,) with N = x.size(0), on x's device.
void check_per_sample(const char* op, const char* name, const at::Tensor& t, const char* xname,
                      const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(supported_float(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": device mismatch, ", name, " is on ", t.device(),
              " but ", xname, " is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.sym_size(0) == x.sym_size(0), op, ": ", name,
              " must have shape (N,) with N = ", xname, ".size(0), ", xname, " has shape ",
              shape_str(x), " but ", name, " has shape ", shape_str(t));
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

void check_sqdiff_norm_backward(const at::Tensor& grad_out, const at::Tensor& a,
                                const at::Tensor& b) {
  check_pair("sqdiff_norm_backward", "a", a, "b", b);
  check_per_sample("sqdiff_norm_backward", "grad_out", grad_out, "a", a);
}

void check_pgd_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad) {
  check_pair("pgd_step", "x_adv", x_adv, "x", x);
  check_pair("pgd_step", "x_adv", x_adv, "grad", grad);
}

void check_mim_step(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                    const at::Tensor& momentum) {
  check_pair("mim_step", "x_adv", x_adv, "x", x);
  check_pair("mim_step", "x_adv", x_adv, "grad", grad);
  check_pair("mim_step", "x_adv", x_adv, "momentum", momentum);
}

void check_apgd_step(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                     const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x) {
  check_pair("apgd_step", "x_adv", x_adv, "x_adv_old", x_adv_old);
  check_pair("apgd_step", "x_adv", x_adv, "grad", grad);
  check_pair("apgd_step", "x_adv", x_adv, "x", x);
  check_per_sample("apgd_step", "step_size", step_size, "x_adv", x_adv);
}

void check_square_window(const at::Tensor& x_best, const at::Tensor& lo, const at::Tensor& hi,
                         const at::Tensor& signs, int64_t vh, int64_t vw, int64_t s) {
  const char* op = "square_window";
  check_pair(op, "x_best", x_best, "lo", lo);
  check_pair(op, "x_best", x_best, "hi", hi);
  TORCH_CHECK(x_best.dim() == 4, op, ": x_best must be (N, C, H, W), got shape ",
              shape_str(x_best));
  const int64_t C = x_best.size(1), H = x_best.size(2), W = x_best.size(3);
  TORCH_CHECK(signs.numel() == C && signs.scalar_type() == x_best.scalar_type() &&
                  signs.device() == x_best.device(),
              op, ": signs must hold ", std::to_string(C),
              " values of x_best's dtype and device, got ", std::to_string(signs.numel()), " ",
              signs.scalar_type(), " values on ", signs.device());
  TORCH_CHECK(s >= 1 && vh >= 0 && vw >= 0 && vh + s <= H && vw + s <= W, op,
              ": the window at (", std::to_string(vh), ", ", std::to_string(vw), ") of side ",
              std::to_string(s), " does not fit images of ", std::to_string(H), " x ",
              std::to_string(W));
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

at::Tensor empty_same_layout(const at::Tensor& t) {
  return at::empty_strided_symint(t.sym_sizes(), t.sym_strides(), t.options());
}

Blocks dense_blocks(at::TensorList ts) {
  Blocks b{dense_all(ts)};
  b.N = ts[0].size(0);
  b.M = b.N > 0 ? ts[0].numel() / b.N : 0;
  return b;
}

// ---- Meta kernels: shapes, dtypes and strides only -------------------------
// Registered for DispatchKey::Meta, which FakeTensor (torch.compile, opcheck)
// uses when no Python fake impl exists. They mirror the real kernels' choices:
// outputs in dense_all's layout of the inputs (x_adv's strides or contiguous),
// per-sample results (N,) in the acc dtype.

namespace {

at::Tensor per_sample_meta(const at::Tensor& x) {
  return at::empty_symint({x.sym_size(0)}, x.options().dtype(acc_dtype(x.scalar_type())));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> perturb_meta(const at::Tensor& x, const at::Tensor& g,
                                                double /*h*/, double /*tiny*/) {
  check_pair("perturb", "x", x, "g", g);
  return {empty_same_layout(dense_all({x, g})[0]), per_sample_meta(x)};
}

at::Tensor sqdiff_norm_meta(const at::Tensor& a, const at::Tensor& b) {
  check_pair("sqdiff_norm", "a", a, "b", b);
  return per_sample_meta(a);
}

std::tuple<at::Tensor, at::Tensor> sqdiff_norm_backward_meta(const at::Tensor& grad_out,
                                                             const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_sqdiff_norm_backward(grad_out, a, b);
  const at::Tensor d = dense_all({a, b})[0];
  return {empty_same_layout(d), empty_same_layout(d)};
}

at::Tensor pgd_step_meta(const at::Tensor& x_adv, const at::Tensor& x, const at::Tensor& grad,
                         double /*alpha*/, double /*eps*/) {
  check_pgd_step(x_adv, x, grad);
  return empty_same_layout(dense_all({x_adv, x, grad})[0]);
}

std::tuple<at::Tensor, at::Tensor> mim_step_meta(const at::Tensor& x_adv, const at::Tensor& x,
                                                 const at::Tensor& grad, const at::Tensor& momentum,
                                                 double /*alpha*/, double /*eps*/,
                                                 double /*decay*/, bool /*per_sample*/) {
  check_mim_step(x_adv, x, grad, momentum);
  const at::Tensor d = dense_all({x_adv, x, grad, momentum})[0];
  return {empty_same_layout(d), empty_same_layout(d)};
}

at::Tensor apgd_step_meta(const at::Tensor& x_adv, const at::Tensor& x_adv_old,
                          const at::Tensor& grad, const at::Tensor& step_size, const at::Tensor& x,
                          double /*eps*/, double /*a*/) {
  check_apgd_step(x_adv, x_adv_old, grad, step_size, x);
  return empty_same_layout(dense_all({x_adv, x_adv_old, grad, x})[0]);
}

at::Tensor square_window_meta(const at::Tensor& x_best, const at::Tensor& lo,
                              const at::Tensor& hi, const at::Tensor& signs, int64_t vh,
                              int64_t vw, int64_t s, double /*step*/) {
  check_square_window(x_best, lo, hi, signs, vh, vw, s);
  return at::empty(x_best.sizes(), x_best.options());
}

}  // namespace guard_fast
