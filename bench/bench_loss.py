"""Training-step time and peak memory of GUARD's loss variants vs plain CE.

Variants (ResNet-18; every step = loss, backward, SGD step):
  ce               plain cross-entropy
  straightforward  Eq. 11 structured like the public code: CE pass, a pass for z, then
                   create_graph passes at x + h z and at x (guard_penalty_reference)
  exact            GuardLoss(mode="exact"): two penalty passes, fused gradient injection
  exact-unfused    the same with one autograd graph (fused=False)
  exact-chunked    exact with chunk_size = batch/4 (same gradients, less memory)
  exact-bntrain    exact with bn_mode="model" (penalty passes in the model's train mode;
                   CE reuses the first penalty pass; not the published BatchNorm semantics;
                   the row keeps its name, bn_mode's older spelling, for bench/results)
  fd               GuardLoss(mode="fd"), central differences (first-order passes only)
  fd-compiled      fd with torch.compile(model) (first-order graphs compile; double
                   backprop through a compiled model does not)
  exact-compiled   exact through guard_fast.compile_guard_step: the loss and all of its
                   backward passes traced as one graph (slow to compile: opt-in on CPU)

Each variant runs in a fresh process so that CPU peak memory (peak RSS growth) is its own,
and first checks its loss and gradient against the straightforward form on the same batch.

    python bench/bench_loss.py --quick                 # < 1 min on a laptop CPU
    python bench/bench_loss.py --device cuda           # full grid on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ["ce", "straightforward", "exact", "exact-unfused", "exact-chunked", "exact-bntrain", "fd",
            "fd-compiled", "exact-compiled"]
DEFAULT_VARIANTS = VARIANTS[:-2]  # compiled variants compile for minutes: ask for them by name
# (name, stem, image size, batch)
FULL_CONFIGS = [("r18-imagenet-224-b32", "imagenet", 224, 32),
                ("r18-imagenet-224-b128", "imagenet", 224, 128),
                ("r18-small-32-b32", "small", 32, 32),
                ("r18-small-32-b128", "small", 32, 128)]
# On a 2-core CPU one straightforward step at 224 px takes tens of seconds: the default CPU
# grid is the reference configuration (small stem, 32 px, batch 32) plus the ImageNet
# stem at 32 px; ask for the 224 px configs by name.
CPU_CONFIGS = [("r18-small-32-b32", "small", 32, 32),
               ("r18-imagenet-32-b32", "imagenet", 32, 32)]
QUICK_CONFIGS = [("r18-imagenet-32-b32", "imagenet", 32, 32)]


def _step_fn(variant, model, x, y, opt, amp_dtype, device):
    """(step, grad_fn): grad_fn() leaves the loss's gradients in .grad and returns the loss;
    step() is zero_grad + grad_fn + optimizer step."""
    import torch
    import torch.nn.functional as F

    from guard_fast import GuardLoss, compile_guard_step, guard_penalty_reference

    crit = {
        "exact": GuardLoss(mode="exact", check=False),
        "exact-unfused": GuardLoss(mode="exact", fused=False, check=False),
        "exact-chunked": GuardLoss(mode="exact", chunk_size=max(1, len(x) // 4), check=False),
        "exact-bntrain": GuardLoss(mode="exact", bn_mode="model", check=False),
        "fd": GuardLoss(mode="fd", check=False),
        "fd-compiled": GuardLoss(mode="fd", check=False),
        "exact-compiled": GuardLoss(mode="exact", check=False),
    }.get(variant)
    fwd_model = torch.compile(model) if variant == "fd-compiled" else model
    compiled = compile_guard_step(model, crit) if variant == "exact-compiled" else None

    def grad_fn():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if compiled is not None:
                return compiled(x, y)
            if variant == "ce":
                loss = F.cross_entropy(model(x), y)
            elif variant == "straightforward":
                loss = F.cross_entropy(model(x), y)
                model.eval()
                loss = loss + guard_penalty_reference(model, x, y, h=3.0, lam=100.0)
                model.train()
            elif variant == "straightforward-bntrain":  # reference for exact-bntrain only
                loss = F.cross_entropy(model(x), y)
                frozen = copy.deepcopy(model)
                for mod in frozen.modules():  # batch statistics, running stats untouched
                    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                        mod.momentum = 0.0
                pen = guard_penalty_reference(frozen, x, y, h=3.0, lam=100.0)
                pen.backward()
                for p, q in zip(model.parameters(), frozen.parameters()):
                    p.grad = q.grad.clone()
                loss = loss + pen.detach()
            else:
                loss = crit(fwd_model, x, y)
        loss.backward()
        return loss.detach()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = grad_fn()
        opt.step()
        return loss

    return step, grad_fn


def worker(spec: dict) -> dict:
    import torch

    from guard_fast.models import resnet18
    from harness import time_fn

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in training
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    model = resnet18(num_classes=spec["classes"], stem=spec["stem"]).to(device)
    x = torch.rand(spec["batch"], 3, spec["size"], spec["size"], device=device)
    y = torch.randint(0, spec["classes"], (spec["batch"],), device=device)
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():  # running statistics that differ from batch statistics
        model(torch.rand_like(x))

    check = {}
    if spec["variant"] not in ("ce", "straightforward"):
        # Correctness before timing: loss and gradient vs the straightforward form.
        grads = {}
        ref = "straightforward-bntrain" if spec["variant"] == "exact-bntrain" else "straightforward"
        for v in (ref, spec["variant"]):
            m = copy.deepcopy(model)
            _, grad_fn = _step_fn(v, m, x, y, torch.optim.SGD(m.parameters(), lr=0.0), amp, device)
            loss = grad_fn()
            grads[v] = (float(loss), torch.cat([p.grad.flatten().float() for p in m.parameters()]))
        (l0, g0), (l1, g1) = grads[ref], grads[spec["variant"]]
        check = {"loss_rel_diff": abs(l1 - l0) / max(abs(l0), 1e-12),
                 "grad_cos": float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)),
                 "grad_rel_diff": float((g1 - g0).norm() / g0.norm().clamp_min(1e-30))}
        del grads, g0, g1, m
        if device.type == "cuda":
            torch.cuda.empty_cache()

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step, grad_fn = _step_fn(spec["variant"], model, x, y, opt, amp, device)
    res = time_fn(step, warmup=spec["warmup"], reps=spec["reps"], device=device)
    if device.type == "cpu" and spec["variant"] not in ("fd-compiled", "exact-compiled"):
        # Exact peak of live tensor memory of one loss + backward (RSS is only a bound).
        from harness import peak_tensor_mb
        res["peak_rss_mb"] = res["peak_mem_mb"]
        res["peak_mem_mb"] = round(peak_tensor_mb(grad_fn), 1)
    return {**res, **check}


def _run(spec: dict, in_process: bool):
    """Run one variant: in this process on CUDA (peak memory comes from the allocator), in a
    fresh process on CPU (peak RSS is per process). Returns (result, error message)."""
    if in_process:
        import torch
        try:
            res = worker(spec)
        except Exception as e:  # a failed variant is reported, the others still run
            res, err = None, f"{type(e).__name__}: {e}".splitlines()[0]
        else:
            err = None
        torch.cuda.empty_cache()
        return res, err
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        return None, (p.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(line[0][7:]), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small config, few reps (< 1 min on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--dtype", default=None, help="fp32,bf16 (comma list; default fp32 on CPU, fp32,bf16 on CUDA)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of variants (default: all but the compiled ones; "
                         "--quick: ce,straightforward,exact,fd)")
    ap.add_argument("--configs", default=None, help="comma list of config names (default by device)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    ap.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    ap.add_argument("--results-dir", default=None, help="where to append loss.jsonl (default bench/results)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from harness import append_result, table

    cuda = args.device.startswith("cuda")
    configs = QUICK_CONFIGS if args.quick else (FULL_CONFIGS if cuda else CPU_CONFIGS)
    if args.configs:
        allc = {c[0]: c for c in FULL_CONFIGS + CPU_CONFIGS + QUICK_CONFIGS}
        unknown = [c for c in args.configs.split(",") if c not in allc]
        if unknown:
            ap.error(f"unknown config(s) {unknown}; known: {sorted(allc)}")
        configs = [allc[c] for c in args.configs.split(",")]
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; known: {VARIANTS}")
    if args.variants == ",".join(VARIANTS):
        variants = ["ce", "straightforward", "exact", "fd"] if args.quick else DEFAULT_VARIANTS
    dtypes = (args.dtype or ("fp32,bf16" if cuda else "fp32")).split(",")
    reps = args.reps or (3 if args.quick else (10 if cuda else 5))
    warmup = args.warmup or (1 if args.quick else (3 if cuda else 1))

    rows = []
    for cname, stem, size, batch in configs:
        for dt in dtypes:
            base = {}
            for v in variants:
                spec = dict(variant=v, device=args.device, stem=stem, size=size, batch=batch,
                            classes=10 if size <= 64 else 100, dtype=dt, reps=reps, warmup=warmup,
                            channels_last=args.channels_last)
                res, err = _run(spec, in_process=cuda)
                if err is not None:
                    print(f"[{cname} {dt} {v}] failed: {err}", file=sys.stderr)
                    row = {"config": cname, "dtype": dt, "variant": v, "error": err[:300]}
                else:
                    base[v] = res
                    row = {"config": cname, "dtype": dt, "variant": v, **res}
                    if "straightforward" in base:
                        row["x_straightforward"] = res["median_ms"] / base["straightforward"]["median_ms"]
                        row["mem_x_straightforward"] = (res["peak_mem_mb"] /
                                                        max(base["straightforward"]["peak_mem_mb"], 1e-9))
                    if "ce" in base:
                        row["x_ce"] = res["median_ms"] / base["ce"]["median_ms"]
                from guard_fast import ops
                dtype_dev = args.device.split(":")[0]
                row.update(device_type=dtype_dev, channels_last=args.channels_last,
                           batch=batch, size=size, stem=stem, quick=args.quick,
                           backend=ops.backend_for(dtype_dev))
                rows.append(append_result("loss", row, args.results_dir, device=args.device))
                print(table([rows[-1]], ["config", "dtype", "variant", "median_ms", "p20_ms", "p80_ms",
                                         "peak_mem_mb", "x_straightforward", "mem_x_straightforward",
                                         "x_ce", "grad_cos"]).splitlines()[-1], flush=True)
    print()
    print(f"device: {rows[0]['device'] if rows else '?'}  torch {rows[0]['torch'] if rows else '?'}")
    print(table(rows, ["config", "dtype", "variant", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
                       "x_straightforward", "mem_x_straightforward", "x_ce", "grad_cos"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
