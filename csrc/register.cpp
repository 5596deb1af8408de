// Operator registration for the guard_fast_C namespace, plus the Python
// module guard_fast._C when built as a torch extension (setup.py defines
// TORCH_EXTENSION_NAME; the CMake build does not and yields a plain shared
// library for torch.ops.load_library).
//
// Importing guard_fast._C loads this library, whose static initialisers below
// register the schemas and kernels; the ops are then torch.ops.guard_fast_C.*.
#include "guard_fast.h"

#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
#include <pybind11/pybind11.h>
#endif

namespace guard_fast {

bool cuda_compiled() {
#ifdef GUARD_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace guard_fast

TORCH_LIBRARY(guard_fast_C, m) {
  // pt2_compliant_tag: the ops are functional (fresh outputs, no aliasing) and
  // have Meta kernels, so torch.compile may trace them without graph breaks.
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def("perturb(Tensor x, Tensor g, float h, float tiny) -> (Tensor, Tensor)", tags);
  m.def("sqdiff_norm(Tensor a, Tensor b) -> Tensor", tags);
  m.def("sqdiff_norm_backward(Tensor grad_out, Tensor a, Tensor b) -> (Tensor, Tensor)", tags);
  // attack steps (no autograd: they run on detached tensors)
  m.def("pgd_step(Tensor x_adv, Tensor x, Tensor grad, float alpha, float eps) -> Tensor", tags);
  m.def("mim_step(Tensor x_adv, Tensor x, Tensor grad, Tensor momentum, float alpha, float eps, "
        "float decay, bool per_sample) -> (Tensor, Tensor)",
        tags);
  m.def("apgd_step(Tensor x_adv, Tensor x_adv_old, Tensor grad, Tensor step_size, Tensor x, "
        "float eps, float a) -> Tensor",
        tags);
  m.def("square_window(Tensor x_best, Tensor lo, Tensor hi, Tensor signs, int vh, int vw, int s, "
        "float step) -> Tensor",
        tags);
  // FAB's L-inf projection, per row (CPU kernel only)
  m.def("fab_project(Tensor t, Tensor w, Tensor b) -> Tensor", tags);
  // instance norm's double backward, per (n, c) group (CPU kernel only)
  m.def("instance_norm_double_backward(Tensor u, Tensor gy, Tensor x, Tensor mean, Tensor rstd, "
        "Tensor weight, Tensor gw_up, Tensor gb_up) -> (Tensor, Tensor, Tensor)",
        tags);
  // 2x2 / stride-2 average pooling and its backward (CPU kernels only)
  m.def("avg_pool2x2(Tensor x) -> Tensor", tags);
  m.def("avg_pool2x2_backward(Tensor gy, int H, int W) -> Tensor", tags);
}

// The ops with a kernel for every backend (GUARD_FAST_DECLARE_KERNELS in
// guard_fast.h), registered as <op>_<backend>.
#define GUARD_FAST_IMPL_KERNELS(m, backend)                                     \
  m.impl("perturb", &guard_fast::perturb_##backend);                            \
  m.impl("sqdiff_norm", &guard_fast::sqdiff_norm_##backend);                    \
  m.impl("sqdiff_norm_backward", &guard_fast::sqdiff_norm_backward_##backend);  \
  m.impl("pgd_step", &guard_fast::pgd_step_##backend);                          \
  m.impl("mim_step", &guard_fast::mim_step_##backend);                          \
  m.impl("apgd_step", &guard_fast::apgd_step_##backend);                        \
  m.impl("square_window", &guard_fast::square_window_##backend)

TORCH_LIBRARY_IMPL(guard_fast_C, CPU, m) {
  GUARD_FAST_IMPL_KERNELS(m, cpu);
  m.impl("fab_project", &guard_fast::fab_project_cpu);
  m.impl("instance_norm_double_backward", &guard_fast::instance_norm_double_backward_cpu);
  m.impl("avg_pool2x2", &guard_fast::avg_pool2x2_cpu);
  m.impl("avg_pool2x2_backward", &guard_fast::avg_pool2x2_backward_cpu);
}

// Meta kernels double as the fake (abstract) impls used by FakeTensor,
// torch.compile and torch.library.opcheck. Because of them, a Python-side
// torch.library.register_fake for these ops would raise: do not add one.
TORCH_LIBRARY_IMPL(guard_fast_C, Meta, m) {
  GUARD_FAST_IMPL_KERNELS(m, meta);
  m.impl("fab_project", &guard_fast::fab_project_meta);
  m.impl("instance_norm_double_backward", &guard_fast::instance_norm_double_backward_meta);
  m.impl("avg_pool2x2", &guard_fast::avg_pool2x2_meta);
  m.impl("avg_pool2x2_backward", &guard_fast::avg_pool2x2_backward_meta);
}

#ifdef GUARD_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(guard_fast_C, CUDA, m) {
  GUARD_FAST_IMPL_KERNELS(m, cuda);
}
#endif

#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "guard_fast C++/CUDA kernels; the ops live in torch.ops.guard_fast_C "
      "(perturb, sqdiff_norm, sqdiff_norm_backward, pgd_step, mim_step, apgd_step, "
      "square_window, fab_project, instance_norm_double_backward, avg_pool2x2).";
  m.def("cuda_compiled", &guard_fast::cuda_compiled,
        "True when the CUDA kernels were compiled into this build.");
}
#endif
