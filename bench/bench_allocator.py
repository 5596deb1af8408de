"""The CLI's host-allocator settings (guard_fast.runtime.allocator) against glibc's defaults,
on the CPU loops that dominate a pipeline run: PGD steps of the robust evaluation and MTT's
unroll. Each measurement is a fresh process (malloc settings are per process), the two arms
alternated round by round; per round the tuned/default time ratio, then its median and
[p20, p80], and the processes' kernel (sys) seconds.

  pgd   10 PGD steps on 500 images (1 x 28 x 28) through the CPU experiments' student
        (ConvNet width 16, BatchNorm, eval mode), one thread
  mtt   one MTT iteration at the fashion-mnist preset's size (100 synthetic images, 28 px,
        ConvNet width 32, syn_steps 10, DSA), one thread

    python bench/bench_allocator.py                   # both, 5 rounds
    python bench/bench_allocator.py --rounds 3 --workloads pgd
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
WORKLOADS = ("pgd", "mtt")


def _pgd():
    import torch
    import torch.nn.functional as F

    from guard_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("convnet", 10, 1, image_size=28, width=16, norm="batchnorm").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x, y = torch.rand(500, 1, 28, 28), torch.randint(0, 10, (500,))

    def run():
        d = torch.zeros_like(x)
        for _ in range(10):
            d.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(net(x + d), y), d)
            d = (d + 2 / 255 * g.sign()).clamp(-8 / 255, 8 / 255).detach()
    return run


def _mtt():
    import torch

    from guard_fast.data import dsa
    from guard_fast.distill import mtt as M
    from guard_fast.models import build_model
    from guard_fast.models.flat import FlatNet

    torch.manual_seed(0)
    flat = FlatNet(build_model("convnet", 10, 1, image_size=28, width=32))
    w0 = flat.flatten()
    wT = w0 + 0.01 * torch.randn_like(w0)
    images = torch.randn(100, 1, 28, 28, requires_grad=True)
    labels = torch.arange(10).repeat_interleave(10)
    lr = torch.tensor(0.01, requires_grad=True)
    plan = M.make_plan(100, 100, 10, dsa.DSA_STRATEGY, 28, torch.Generator().manual_seed(1))
    return lambda: torch.autograd.grad(M.unroll_loss(flat, w0, wT, images, labels, lr, plan),
                                       (images, lr))


def _child(workload: str, arm: str, reps: int) -> None:
    import torch

    from guard_fast.runtime.allocator import tune_cpu_allocator

    torch.set_num_threads(1)
    state = tune_cpu_allocator() if arm == "tuned" else "default"
    fn = {"pgd": _pgd, "mtt": _mtt}[workload]()
    fn()   # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"allocator": state, "seconds": sorted(times)[len(times) // 2],
                      "sys_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime,
                      "minor_faults": r1.ru_minflt - r0.ru_minflt}))


def _measure(workload: str, arm: str, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", workload, arm, str(reps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _q(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per process (median)")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    from harness import append_result, table

    rows = []
    for w in [x for x in a.workloads.split(",") if x]:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
        got = {"default": [], "tuned": []}
        for r in range(a.rounds):
            for arm in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
                got[arm].append(_measure(w, arm, a.reps))
        if any(g["allocator"] != "tuned" for g in got["tuned"]):
            raise SystemExit(f"the allocator was not tuned here: {got['tuned'][0]['allocator']}")
        ratio = [t["seconds"] / d["seconds"] for t, d in zip(got["tuned"], got["default"])]
        row = {"bench": "allocator", "workload": w, "rounds": a.rounds, "reps": a.reps,
               "default_s": round(_q([g["seconds"] for g in got["default"]], 0.5), 3),
               "tuned_s": round(_q([g["seconds"] for g in got["tuned"]], 0.5), 3),
               "tuned_over_default": round(_q(ratio, 0.5), 3),
               "ratio_p20": round(_q(ratio, 0.2), 3), "ratio_p80": round(_q(ratio, 0.8), 3),
               "default_sys_s": round(_q([g["sys_s"] for g in got["default"]], 0.5), 2),
               "tuned_sys_s": round(_q([g["sys_s"] for g in got["tuned"]], 0.5), 2),
               "default_faults": int(_q([g["minor_faults"] for g in got["default"]], 0.5)),
               "tuned_faults": int(_q([g["minor_faults"] for g in got["tuned"]], 0.5)),
               "threads": 1, "timing": f"fresh process per arm, alternated, {a.rounds} rounds"}
        rows.append(append_result("allocator", row, a.results_dir, "cpu"))
    print(table(rows, ["workload", "default_s", "tuned_s", "tuned_over_default", "ratio_p20",
                       "ratio_p80", "default_sys_s", "tuned_sys_s", "default_faults",
                       "tuned_faults"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
