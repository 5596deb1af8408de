"""Microbenchmark of the core GUARD-loss ops by backend, to choose the registry's default.

    python bench/bench_ops.py [--device cuda] [--quick] [--results-dir DIR]

For guard_fast::perturb, sqdiff_norm and sqdiff_norm_backward at a CIFAR-like and an
ImageNet-like shape (fp32 and bf16): the plain-PyTorch reference, each backend's kernel
called directly (cpp or cuda from guard_fast._C, triton from kernels/guard_penalty.py),
and the registered op (what the loss calls, with the registry's dispatch). Each
implementation is first checked against the reference (fp32: 1e-5 relative; bf16: the
result dtype's rounding), then timed as `--calls` back-to-back calls per rep (per-call
time = rep time / calls, so one host sync per rep does not swamp microsecond kernels).
Rows go to bench/results/ops.jsonl (area "ops").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(128, 3, 32, 32), (64, 3, 224, 224)]


def cases(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(shape, generator=g).to(device, dtype)
    gr = torch.randn(shape, generator=g).to(device, dtype)
    a = torch.randn(shape, generator=g).to(device, dtype)
    b = torch.randn(shape, generator=g).to(device, dtype)
    go = torch.rand(shape[0], generator=g).to(device, torch.float32 if dtype != torch.float64
                                              else torch.float64)
    return {"perturb": (x, gr, 3.0, 1e-12), "sqdiff_norm": (a, b),
            "sqdiff_norm_backward": (go, a, b)}


def traffic(name, args):
    """Bytes each op must move at least (inputs read, outputs written)."""
    t = args[1]   # an (N, ...) input in every case
    per = t.numel() * t.element_size()
    return {"perturb": 3 * per, "sqdiff_norm": 2 * per, "sqdiff_norm_backward": 4 * per}[name]


def _close(got, want, dtype):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g_, w_ in zip(got, want):
        d = (g_.double() - w_.double()).abs().max().item()
        scale = w_.double().abs().max().item() + 1e-12
        if d > tol * scale:
            return False, d / scale
    return True, 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer reps")
    ap.add_argument("--calls", type=int, default=None, help="calls per timed rep")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    from harness import append_result, time_fn

    from guard_fast import ops
    from guard_fast.kernels import guard_penalty as gp

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    calls = args.calls or (5 if args.quick else 50)
    reps = args.reps or (3 if args.quick else 10)
    names = ("perturb", "sqdiff_norm", "sqdiff_norm_backward")
    impls = {"torch": {n: getattr(gp, n + "_ref") for n in names},
             "op": {n: getattr(ops, n) for n in names}}
    if ops.extension is not None and (device.type == "cpu" or ops.extension.cuda_compiled()):
        impls["cuda" if device.type == "cuda" else "cpp"] = {
            n: getattr(torch.ops.guard_fast_C, n) for n in names}
    if gp.HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls["triton"] = {n: getattr(gp, n + "_triton") for n in names}
    picked = ops.backend_for(device.type)
    print(f"[ops] device {device}, backends {', '.join(impls)}; registry picks {picked!r}; "
          f"{calls} calls per rep, {reps} reps")
    base = {"area": "ops", "device_type": device.type, "quick": args.quick,
            "threads": torch.get_num_threads(), "calls_per_rep": calls, "registry": picked}
    t0 = time.perf_counter()
    for shape in SHAPES[:1] if args.quick else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and device.type == "cpu" and args.quick:
                continue
            cs = cases(shape, dtype, device)
            for name, a in cs.items():
                want = impls["torch"][name](*a)
                line = []
                for impl, table in impls.items():
                    fn = table[name]
                    ok, err = _close(fn(*a), want, dtype)
                    if not ok:
                        raise SystemExit(f"[ops] {name} {impl} {shape} {dtype}: relative error "
                                         f"{err:.3g} against the reference; not timing")

                    def loop(fn=fn, a=a):
                        for _ in range(calls):
                            fn(*a)
                    r = time_fn(loop, warmup=2, reps=reps, device=device)
                    us = r["median_ms"] * 1e3 / calls
                    gbs = traffic(name, a) / (us * 1e-6) / 1e9
                    append_result("ops", {**base, "op": name, "impl": impl, "shape": list(shape),
                                          "dtype": str(dtype).replace("torch.", ""),
                                          "us_per_call": us, "gb_per_s": gbs, **r},
                                  results_dir=args.results_dir, device=device)
                    line.append(f"{impl} {us:.1f} us ({gbs:.0f} GB/s)")
                print(f"[ops] {name:<21} {'x'.join(map(str, shape)):<12} "
                      f"{str(dtype).replace('torch.', ''):<8} " + "; ".join(line), flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
