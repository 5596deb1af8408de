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
  ce-graph,        the whole step (every pass, the double backward, the SGD step) captured
  exact-graph      once in a CUDA graph and replayed (guard_fast.losses.step.TrainStep);
                   off CUDA the step warns and runs eagerly (the row's step_mode says so)
  ce-compile-step, TrainStep(mode="compile"): loss + backward as one compiled graph and the
  exact-compile-step  compiled optimizer step (slow to compile: opt-in, like exact-compiled)

Every row also carries the step's FLOPs (PyTorch's formulas, bench/flops.py: a dispatch
mode that sees the passes inside the fused loss's autograd.grad) and the number of ops
dispatched (the launches of an eager step), counted on one extra step on the same device;
a graph or compiled variant is counted as its eager counterpart (ops_of). tflops is the
achieved rate at the median time, peak_frac its fraction of the device's dense peak for
the math the dtype runs on (GPUs listed in bench/flops.py).

Check before timing: each variant's loss and gradient vs the straightforward form on the
same batch (loss_rel_diff, grad_cos, grad_rel_diff); a TrainStep variant (graph, compile)
runs three steps beside its eager counterpart at the same dtype and an fp64 eager reference
(on the first 16 samples) and must err against fp64 by at most twice what the eager step
errs (+1e-6): step_err, eager_err. A variant that fails the check is not timed.

Each variant runs in a fresh process so that CPU peak memory (peak RSS growth) is its own,
and first checks its loss and gradient against the straightforward form on the same batch.

    python bench/bench_loss.py --quick                 # < 1 min on a laptop CPU
    python bench/bench_loss.py --device cuda           # full grid on a GPU
    python bench/bench_loss.py --counts-only           # FLOPs / ops of every variant, no timing
    python bench/bench_loss.py --summary OUT/loss.jsonl  # pair one run's rows (ratios)
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
            "ce-graph", "exact-graph", "fd-compiled", "exact-compiled", "ce-compile-step",
            "exact-compile-step"]
# compiled variants compile for minutes: ask for them by name
DEFAULT_VARIANTS = [v for v in VARIANTS if "compile" not in v]
# TrainStep variants: (eager counterpart, TrainStep mode)
STEP_VARIANTS = {"ce-graph": ("ce", "graph"), "exact-graph": ("exact", "graph"),
                 "ce-compile-step": ("ce", "compile"), "exact-compile-step": ("exact", "compile")}
# what a variant's FLOPs and ops are counted on (a graph replay or compiled code dispatches
# no aten ops one by one; the arithmetic is its eager counterpart's)
COUNTED_AS = {"fd-compiled": "fd", "exact-compiled": "exact",
              **{k: v[0] for k, v in STEP_VARIANTS.items()}}
CHECK_BATCH = 16  # samples of the three-step check of a TrainStep variant
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
# the smallest step that still runs every layer: the CPU smoke of gpu_suite.sh (its
# numbers check the wiring, not the speed)
SMOKE_CONFIGS = [("r18-imagenet-32-b8", "imagenet", 32, 8)]


def _step_fn(variant, model, x, y, opt, amp_dtype, device, warmup=2):
    """(step, grad_fn): grad_fn() leaves the loss's gradients in .grad and returns the loss;
    step() is zero_grad + grad_fn + optimizer step. A TrainStep variant has no grad_fn
    (None); its step() is the TrainStep (warmup: its eager calls before the capture)."""
    import torch
    import torch.nn.functional as F

    from guard_fast import GuardLoss, compile_guard_step, guard_penalty_reference

    if variant in STEP_VARIANTS:
        from guard_fast.losses.step import TrainStep

        base, mode = STEP_VARIANTS[variant]
        crit = (GuardLoss(mode="exact", check=False) if base == "exact"
                else (lambda m, xb, yb: F.cross_entropy(m(xb), yb)))
        ts = TrainStep(model, crit, opt, mode=mode, amp_dtype=amp_dtype, warmup=warmup)
        step = lambda: ts(x, y)  # noqa: E731
        step.train_step = ts
        return step, None

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

    if spec.get("counts_only"):
        return _counts(spec, model, x, y, amp, device, None)
    check = {}
    if spec["variant"] in STEP_VARIANTS:
        check = _check_step(spec["variant"], model, x, y, amp, device)
    elif spec["variant"] not in ("ce", "straightforward"):
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
    if hasattr(step, "train_step"):  # the mode that ran ("eager" after a fallback)
        res["step_mode"] = step.train_step.mode
    res.update(_counts(spec, model, x, y, amp, device, res["median_ms"]))
    if device.type == "cpu" and grad_fn is not None and "compiled" not in spec["variant"]:
        # Exact peak of live tensor memory of one loss + backward (RSS is only a bound).
        from harness import peak_tensor_mb
        res["peak_rss_mb"] = res["peak_mem_mb"]
        res["peak_mem_mb"] = round(peak_tensor_mb(grad_fn), 1)
    return {**res, **check}


def _counts(spec, model, x, y, amp, device, median_ms) -> dict:
    """FLOPs, ops and host syncs of one step of the variant (its eager counterpart for a
    graph or compiled one), on a copy of the model, after one uncounted step (steady state:
    the optimizer's momentum buffers exist); achieved TFLOP/s and fraction of peak."""
    import torch

    from flops import count, throughput
    from harness import device_name

    variant = COUNTED_AS.get(spec["variant"], spec["variant"])
    m = copy.deepcopy(model)
    step, _ = _step_fn(variant, m, x, y, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
                       amp, device)
    step()
    c = count(step)
    out = {"gflops": c["flops"] / 1e9, "ops": c["ops"], "syncs": c["syncs"], "ops_of": variant,
           "top_ops": c["top_ops"]}
    if median_ms is not None:
        out.update(throughput(c["flops"], median_ms, device_name(device), spec["dtype"]))
    return out


def _trajectory(variant, model, x, y, amp, device, steps=3) -> tuple:
    """(losses, last gradients, momentum buffers) of `steps` SGD steps of `variant` from a
    copy of model, as float64 vectors (warm-up 1: a graph variant runs eagerly, captures,
    replays). lr = 0: the weights stay put, so the three steps compare the same point (a
    few steps of lr > 0 on a small batch are chaotic enough that fp32 and fp64 part ways,
    and the check would compare trajectories, not steps); the momentum buffers still show
    that the optimizer step ran each time. BatchNorm's running statistics do move."""
    import torch

    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)
    step, _ = _step_fn(variant, m, x, y, opt, amp, device, warmup=1)
    losses = torch.stack([step().double() for _ in range(steps)])
    g = torch.cat([p.grad.flatten().double() for p in m.parameters()])
    buf = torch.cat([opt.state[p]["momentum_buffer"].flatten().double() for p in m.parameters()])
    return losses, g, buf


def _check_step(variant, model, x, y, amp, device) -> dict:
    """A TrainStep variant against its eager counterpart at the same dtype and an fp64
    eager reference (three steps on the first CHECK_BATCH samples): the variant's error vs
    fp64 may be at most twice the eager step's + 1e-6 (design.md habit 5). Raises if not."""
    import torch

    base = STEP_VARIANTS[variant][0]
    xs, ys = x[:CHECK_BATCH], y[:CHECK_BATCH]
    m64 = copy.deepcopy(model).double().to(memory_format=torch.contiguous_format)
    ref = _trajectory(base, m64, xs.double().contiguous(), ys, None, device)
    del m64

    def err(t):
        return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(t, ref))

    eager = _trajectory(base, model, xs, ys, amp, device)
    got = _trajectory(variant, model, xs, ys, amp, device)
    out = {"step_err": err(got), "eager_err": err(eager),
           "step_rel_diff": max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                for a, b in zip(got, eager))}
    if not out["step_err"] <= 2 * out["eager_err"] + 1e-6:
        raise RuntimeError(f"{variant} fails the check: error vs fp64 {out['step_err']:.3g} > "
                           f"2 x eager's {out['eager_err']:.3g} + 1e-6")
    return out


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
    ap.add_argument("--counts-only", action="store_true",
                    help="FLOPs and ops per step only (no check, no timing; one process): "
                         "device-independent figures for every variant in a few steps each")
    ap.add_argument("--summary", default=None, metavar="LOSS_JSONL",
                    help="only pair the rows of this loss.jsonl (ratios, bf16 speed-ups) and "
                         "append them to loss_summary.jsonl in --results-dir")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: run the variants in this process, not one fresh process each "
                         "(peak RSS is then shared; the smoke run saves the start-ups)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.summary:
        if not Path(args.summary).is_file():
            ap.error(f"--summary: no such file {args.summary}")
        summarize(args.summary, args.results_dir)
        return 0

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from harness import append_result, table

    cuda = args.device.startswith("cuda")
    configs = QUICK_CONFIGS if args.quick else (FULL_CONFIGS if cuda else CPU_CONFIGS)
    if args.configs:
        allc = {c[0]: c for c in FULL_CONFIGS + CPU_CONFIGS + QUICK_CONFIGS + SMOKE_CONFIGS}
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
                            channels_last=args.channels_last, counts_only=args.counts_only)
                res, err = _run(spec, in_process=cuda or args.counts_only or args.in_process)
                if err is not None:
                    print(f"[{cname} {dt} {v}] failed: {err}", file=sys.stderr)
                    row = {"config": cname, "dtype": dt, "variant": v, "error": err[:300]}
                else:
                    base[v] = res
                    row = {"config": cname, "dtype": dt, "variant": v, **res}
                    if "straightforward" in base and not args.counts_only:
                        row["x_straightforward"] = res["median_ms"] / base["straightforward"]["median_ms"]
                        row["mem_x_straightforward"] = (res["peak_mem_mb"] /
                                                        max(base["straightforward"]["peak_mem_mb"], 1e-9))
                    if "ce" in base and not args.counts_only:
                        row["x_ce"] = res["median_ms"] / base["ce"]["median_ms"]
                    if "ce" in base:
                        row["flops_x_ce"] = res["gflops"] / base["ce"]["gflops"]
                        row["ops_x_ce"] = res["ops"] / base["ce"]["ops"]
                    same = "ce-" + STEP_VARIANTS[v][1] if v in STEP_VARIANTS else None
                    if same in base and same != v and not args.counts_only:  # exact-graph vs ce-graph, ...
                        row["x_ce_same_mode"] = res["median_ms"] / base[same]["median_ms"]
                from guard_fast import ops
                dtype_dev = args.device.split(":")[0]
                row.update(device_type=dtype_dev, channels_last=args.channels_last,
                           counts_only=args.counts_only,
                           batch=batch, size=size, stem=stem, quick=args.quick,
                           backend=ops.backend_for(dtype_dev))
                rows.append(append_result("loss", row, args.results_dir, device=args.device))
                print(table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
    print()
    print(f"device: {rows[0]['device'] if rows else '?'}  torch {rows[0]['torch'] if rows else '?'}")
    print(table(rows, COLUMNS))
    return 0


# issue 17's targets on a GPU (same model, batch and dtype, one run)
TARGETS = {"guard_x_ce": 5.5, "guard_x_straightforward": 0.6, "bf16_cl_speedup": 1.8}


def summarize(path, results_dir=None) -> list[dict]:
    """Pair the rows of one run (a loss.jsonl): per (config, dtype, layout) the GUARD/CE and
    GUARD/straightforward time ratios, eager and CUDA-graph side by side, with the FLOP and
    ops ratios and peak fractions; per config the bf16 + channels_last speed-up over fp32
    (contiguous). Appends them to loss_summary.jsonl (with the measured rows' device and
    commit) and prints them. A later row of the same variant replaces an earlier one."""
    from harness import append_result, table

    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    by: dict = {}
    for r in rows:
        if "error" not in r and not r.get("counts_only"):
            by.setdefault((r["config"], r["dtype"], bool(r.get("channels_last"))), {})[r["variant"]] = r

    def ratio(vs, a, b, field="median_ms"):
        return vs[a][field] / vs[b][field] if a in vs and b in vs and vs[b].get(field) else None

    out = []
    for (cfg, dt, cl), vs in by.items():
        s = {"kind": "ratios", "config": cfg, "dtype": dt, "channels_last": cl,
             "guard_x_ce": ratio(vs, "exact", "ce"),
             "guard_x_straightforward": ratio(vs, "exact", "straightforward"),
             "graph_guard_x_ce": ratio(vs, "exact-graph", "ce-graph"),
             "graph_guard_x_straightforward": ratio(vs, "exact-graph", "straightforward"),
             "graph_speedup_ce": ratio(vs, "ce", "ce-graph"),
             "graph_speedup_exact": ratio(vs, "exact", "exact-graph"),
             "flops_guard_x_ce": ratio(vs, "exact", "ce", "gflops"),
             "ops_guard_x_ce": ratio(vs, "exact", "ce", "ops")}
        for v in ("ce", "exact", "exact-graph"):
            s[f"peak_frac_{v}"] = vs.get(v, {}).get("peak_frac")
        best = [x for x in (s["guard_x_ce"], s["graph_guard_x_ce"]) if x is not None]
        if best:
            s["meets_guard_x_ce"] = min(best) <= TARGETS["guard_x_ce"]
        best = [x for x in (s["guard_x_straightforward"], s["graph_guard_x_straightforward"])
                if x is not None]
        if best:
            s["meets_guard_x_straightforward"] = min(best) <= TARGETS["guard_x_straightforward"]
        out.append(s)
    for cfg in sorted({k[0] for k in by}):
        a, b = by.get((cfg, "fp32", False)), by.get((cfg, "bf16", True))
        for v in ("ce", "straightforward", "exact", "ce-graph", "exact-graph"):
            if a and b and v in a and v in b:
                sp = a[v]["median_ms"] / b[v]["median_ms"]
                out.append({"kind": "bf16_cl_speedup", "config": cfg, "variant": v,
                            "bf16_cl_speedup": sp,
                            "meets_bf16_cl_speedup": sp >= TARGETS["bf16_cl_speedup"]})
    src = rows[-1] if rows else {}
    for s in out:
        s.update(device=src.get("device"), commit=src.get("commit"), measured=src.get("date"),
                 targets=TARGETS)
        append_result("loss_summary", s, results_dir, device=src.get("device_type", "cpu"))
    for kind in ("ratios", "bf16_cl_speedup"):
        sel = [s for s in out if s["kind"] == kind]
        if sel:
            print(table(sel, [k for k in sel[0] if k not in ("kind", "targets", "device",
                                                             "commit", "measured")]))
    print(f"device: {src.get('device')}  commit {src.get('commit')}  targets {TARGETS}")
    return out


COLUMNS = ["config", "dtype", "channels_last", "variant", "median_ms", "p20_ms", "p80_ms",
           "peak_mem_mb", "x_straightforward", "x_ce", "x_ce_same_mode", "gflops", "flops_x_ce",
           "ops", "ops_x_ce", "tflops", "peak_frac", "grad_cos", "step_err", "eager_err"]


if __name__ == "__main__":
    raise SystemExit(main())
