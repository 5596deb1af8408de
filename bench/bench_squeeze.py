"""Squeeze throughput: images/s of a teacher training step for each regularizer against plain
CE, and data-loading images/s of the DALI pipeline against torchvision on the same JPEGs.

  compute  one fixed batch, full step (loss, backward, SGD); images/s = batch / median step
  loader   one epoch over a synthetic ImageFolder of real JPEG files, train transforms
           (random resized crop + flip), torchvision (workers 0 and 2) vs DALI, timed alone
  loader_vs_step  the fastest loader's images/s over each compute row's: > 1 means the
           loader alone outruns that step (it is not the bottleneck)

The step is guard_fast.losses.step.TrainStep: --step-mode graph captures it whole in a CUDA
graph, --amp bf16 and --channels-last pick the tensor-core kernels.

    python bench/bench_squeeze.py --quick          # < 1 min on a 2-core CPU
    python bench/bench_squeeze.py --device cuda    # ImageNette-shaped: 224 px, batch 32
    python bench/bench_squeeze.py --device cuda --regularizers none,guard --batch 128 \
        --step-mode graph --amp bf16 --channels-last --skip-loader
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REGULARIZERS = ["none", "guard", "gr", "pgd-at", "trades", "fbf"]


def compute_rows(args, device) -> list[dict]:
    from guard_fast.config import resolve_squeeze
    from guard_fast.distill.squeeze import build_criterion
    from guard_fast.losses.step import TrainStep
    from guard_fast.models import build_model
    from harness import time_fn

    rows, base = [], None
    for reg in args.regularizers.split(","):
        torch.manual_seed(0)
        model = build_model(args.model, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3).to(device)
        x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        crit = build_criterion(resolve_squeeze(dict(regularizer=reg)))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        model.train()
        # zero_grad, loss, backward, SGD step; eager, or captured / compiled whole
        ts = TrainStep(model, crit, opt, mode=args.step_mode, channels_last=args.channels_last,
                       amp_dtype=torch.bfloat16 if args.amp == "bf16" else None)
        r = time_fn(lambda: ts(x, y), warmup=args.warmup, reps=args.reps, device=device)
        r.update(area="squeeze", kind="compute", regularizer=reg, model=args.model,
                 image_size=args.image_size, batch=args.batch, device_type=device.type,
                 images_per_s=args.batch / (r["median_ms"] / 1e3), step_mode=ts.mode,
                 amp=args.amp, channels_last=args.channels_last)
        base = base or (r if reg == "none" else None)
        if base:
            r["x_slower_than_ce"] = base["images_per_s"] / r["images_per_s"]
        rows.append(r)
        print(f"compute {reg:7s} {r['images_per_s']:8.1f} img/s  (median {r['median_ms']:.0f} ms)",
              flush=True)
    return rows


def loader_rows(args, device) -> list[dict]:
    from guard_fast.data import ImageFolderDataset, make_loader, write_synthetic_imagefolder
    from guard_fast.data.dali import dali_available

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_imagefolder(tmp, num_classes=10, per_class=args.loader_images // 10,
                                    size=args.jpeg_size, splits=("train",))
        ds = ImageFolderDataset(tmp, "train", "imagenet", args.crop)
        variants = [("torch", 0), ("torch", 2)] + ([("dali", 2)] if dali_available() else [])
        for backend, workers in variants:
            kw = dict(backend=backend, workers=workers, batch_size=128, shuffle=True, seed=0)
            if backend == "dali":
                kw["device"] = device.type
            for warm in (True, False):  # first epoch warms caches and pipelines
                t0 = time.perf_counter()
                n = 0
                for xb, _ in make_loader(ds, epoch=int(warm), **kw):
                    n += len(xb)
                dt = time.perf_counter() - t0
            r = dict(area="squeeze", kind="loader", backend=backend, workers=workers, images=n,
                     jpeg_size=args.jpeg_size, crop=args.crop, device_type=device.type,
                     images_per_s=n / dt)
            rows.append(r)
            print(f"loader  {backend:5s} workers={workers}  {r['images_per_s']:8.1f} img/s", flush=True)
        if not dali_available():
            print("loader  dali: not installed (pip install nvidia-dali-cuda130)", flush=True)
    return rows


def loader_vs_step(rows: list[dict]) -> list[dict]:
    """The loader alone against each step: the fastest loader's images/s over the step's
    (at the step's batch; > 1: the loader can feed that step, it is not the bottleneck).
    The loader epoch runs at the training crop, the compute rows at --image-size."""
    loaders = [r for r in rows if r["kind"] == "loader"]
    if not loaders:
        return []
    best = max(loaders, key=lambda r: r["images_per_s"])
    out = []
    for r in (r for r in rows if r["kind"] == "compute"):
        ratio = best["images_per_s"] / r["images_per_s"]
        out.append(dict(area="squeeze", kind="loader_vs_step", regularizer=r["regularizer"],
                        step_mode=r["step_mode"], amp=r["amp"], device_type=r["device_type"],
                        loader=f"{best['backend']} workers={best['workers']}",
                        loader_images_per_s=best["images_per_s"],
                        step_images_per_s=r["images_per_s"],
                        loader_over_step=ratio, loader_faster=ratio > 1))
        print(f"loader/step {r['regularizer']:7s} {ratio:6.2f}x  ({out[-1]['loader']})", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 min on CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--regularizers", default=",".join(REGULARIZERS), help="comma list")
    ap.add_argument("--model", default="resnet18", help="model name (default: resnet18)")
    ap.add_argument("--image-size", type=int, default=None, help="px (default: 32 CPU, 224 CUDA)")
    ap.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps (default: 3 CPU, 10 CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (default: 1)")
    ap.add_argument("--loader-images", type=int, default=None, help="JPEGs per loader epoch")
    ap.add_argument("--jpeg-size", type=int, default=None, help="JPEG side, px (default 128 CPU, 256 CUDA)")
    ap.add_argument("--crop", type=int, default=None, help="training crop, px (default 112 CPU, 224 CUDA)")
    ap.add_argument("--step-mode", default="eager", choices=["eager", "graph", "compile"],
                    help="compute rows: the step eager, captured in a CUDA graph, or compiled "
                         "(guard_fast.losses.step.TrainStep)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="compute rows: autocast")
    ap.add_argument("--channels-last", action="store_true", help="compute rows: channels_last")
    ap.add_argument("--skip-loader", action="store_true", help="compute rows only")
    ap.add_argument("--results-dir", default=None, help="where squeeze.jsonl goes (default bench/results)")
    args = ap.parse_args(argv)
    from harness import append_result

    from guard_fast.runtime import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.image_size = args.image_size or (224 if cuda else 32)
    args.reps = args.reps or (10 if cuda else (2 if args.quick else 3))
    args.loader_images = args.loader_images or (320 if args.quick else 2000)
    args.jpeg_size = args.jpeg_size or (256 if cuda else 128)
    args.crop = args.crop or (224 if cuda else 112)
    if args.quick:
        args.regularizers = "none,guard"
    rows = compute_rows(args, device)
    if not args.skip_loader:
        rows += loader_rows(args, device)
        rows += loader_vs_step(rows)
    for r in rows:
        append_result("squeeze", {**r, "quick": args.quick}, args.results_dir, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
