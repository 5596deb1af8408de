// The per-element math of the attack steps, one definition for the CPU kernels
// (attack_steps_cpu.cpp) and the CUDA kernels (attack_steps_cuda.cu); the
// Python references in kernels/attack_steps.py state the same steps in torch.
//
// Bit-exactness with eager PyTorch (fp32/fp64) needs one IEEE-rounded
// operation per step, in eager's order, and no FMA contraction. On the device
// the *_rn helpers are the __f*_rn / __d*_rn intrinsics, which nvcc never
// contracts (it does contract plain a * b + c by default). On the host they are
// plain operators, so a C++ file that includes this header must switch
// contraction off before its first include (attack_steps_cpu.cpp does, and
// defines GUARD_FAST_FP_CONTRACT_OFF to say so).
//
// T is the compute type acc_t (float or double); values are converted to it
// before and rounded to the storage type after, by the callers.
#pragma once

#include "guard_fast.h"

#include <c10/macros/Macros.h>

#if !defined(__CUDACC__) && !defined(GUARD_FAST_FP_CONTRACT_OFF)
#error "attack_steps.h needs FP contraction off in C++ files (see attack_steps_cpu.cpp)"
#endif

// Host and device, always inlined (the CUDA kernels unroll their pack loops as
// they did with the math written out in place).
#ifdef __CUDACC__
#define GUARD_FAST_STEP_FN __host__ __device__ __forceinline__
#else
#define GUARD_FAST_STEP_FN C10_ALWAYS_INLINE
#endif

namespace guard_fast {
namespace attack {

// torch.sign: 1, -1, or 0 (for +-0 and NaN).
template <typename T>
GUARD_FAST_STEP_FN T sign_of(T v) {
  return static_cast<T>(static_cast<int>(T(0) < v) - static_cast<int>(v < T(0)));
}

// torch.clamp(v, lo, hi) = min(max(v, lo), hi), NaN passing through.
template <typename T>
GUARD_FAST_STEP_FN T clamp_to(T v, T lo, T hi) {
  v = v < lo ? lo : v;
  return hi < v ? hi : v;
}

// One IEEE-rounded operation each, never fused into an FMA: the intrinsics on
// the device, plain operators on the host (see the top of this file).
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename T> inline T add_rn(T a, T b) { return a + b; }
template <typename T> inline T sub_rn(T a, T b) { return a - b; }
template <typename T> inline T mul_rn(T a, T b) { return a * b; }
template <typename T> inline T div_rn(T a, T b) { return a / b; }
#endif

// torchattacks' PGD step: clamp(x + clamp(x_adv + alpha*sign(g) - x, -eps, eps), 0, 1).
template <typename T>
GUARD_FAST_STEP_FN T pgd(T xa, T x, T g, T alpha, T eps) {
  T v = add_rn(mul_rn(sign_of(g), alpha), xa);
  v = add_rn(clamp_to(sub_rn(v, x), -eps, eps), x);
  return clamp_to(v, T(0), T(1));
}

// MI-FGSM's momentum m = g / c + decay * momentum (c: the sample's or the batch's
// |g| scale), computed in T; the caller rounds it to the storage type, and the
// step then takes the sign of that stored value.
template <typename T>
GUARD_FAST_STEP_FN T mim_momentum(T g, T mom, T c, T decay) {
  return add_rn(div_rn(g, c), mul_rn(mom, decay));
}

// MI-FGSM's step from the stored momentum m: x_adv + alpha * sign(m), projected
// like PGD (kPerSample: torchattacks) or as clamp(clamp(v, x - eps, x + eps), 0, 1)
// (batch: GUARD's public code). A template flag, not an argument: with a runtime
// flag nvcc unrolled the fp64 kernel's loop differently.
template <bool kPerSample, typename T>
GUARD_FAST_STEP_FN T mim(T xa, T x, T m, T alpha, T eps) {
  T v = add_rn(mul_rn(sign_of(m), alpha), xa);
  if constexpr (kPerSample) {
    v = add_rn(clamp_to(sub_rn(v, x), -eps, eps), x);
  } else {
    v = clamp_to(v, sub_rn(x, eps), add_rn(x, eps));
  }
  return clamp_to(v, T(0), T(1));
}

// fra31's APGD step with lo = max(x - eps, 0), hi = min(x + eps, 1):
// z = clamp(x_adv + step*sign(g), lo, hi); clamp((z - x_adv)*a + x_adv + (x_adv - x_old)*b,
// lo, hi) with b = 1 - a, in exactly that grouping.
template <typename T>
GUARD_FAST_STEP_FN T apgd(T xa, T xo, T g, T x, T step, T eps, T a, T b) {
  T lo = sub_rn(x, eps);
  lo = lo < T(0) ? T(0) : lo;
  T hi = add_rn(x, eps);
  hi = T(1) < hi ? T(1) : hi;
  T z = clamp_to(add_rn(mul_rn(sign_of(g), step), xa), lo, hi);
  z = add_rn(mul_rn(sub_rn(z, xa), a), xa);
  z = add_rn(z, mul_rn(sub_rn(xa, xo), b));
  return clamp_to(z, lo, hi);
}

// Square's window pixel: clamp(x + sign * step, lo, hi).
template <typename T>
GUARD_FAST_STEP_FN T square(T x, T sign, T step, T lo, T hi) {
  return clamp_to(add_rn(x, mul_rn(sign, step)), lo, hi);
}

}  // namespace attack
}  // namespace guard_fast
