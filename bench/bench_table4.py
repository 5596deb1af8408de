"""The paper's Table 4: time per squeeze iteration and peak memory for each teacher
regularizer (plain CE, GUARD, PGD-AT, TRADES, Fast-is-better-than-free), on one fixed batch
of the pipeline preset's training images and its squeeze model.

  time    median of the timed full steps (loss, backward, SGD step), harness.time_fn
  memory  CUDA: max_memory_allocated over the timed steps minus what was allocated before;
          CPU: peak of live tensor bytes of one step (harness.peak_tensor_mb), exact where
          RSS is not

    python bench/bench_table4.py --smoke --out runs/table4         # seconds on a CPU
    python bench/bench_table4.py --device cuda --out runs/table4   # bundled digits, batch 64
    python bench/bench_table4.py --preset imagenette --data PATH --device cuda --out DIR

Writes DIR/results.md (the table) and DIR/results.json, and appends one row per
regularizer to bench/results/table4.jsonl (--results-dir to change).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

REGULARIZERS = ("none", "guard", "pgd-at", "trades", "fbf")
NAMES = {"none": "SRe2L (plain CE)", "guard": "GUARD", "pgd-at": "PGD-AT (7 steps)",
         "trades": "TRADES (public code)", "fbf": "Fast-is-better-than-free"}


def measure(args, device: torch.device) -> tuple[list[dict], dict]:
    """One row per regularizer: s_per_iteration (median) and peak_mem_mb; and the squeeze
    settings used (model, image size, batch)."""
    from harness import peak_tensor_mb, time_fn

    from guard_fast.config import resolve_squeeze
    from guard_fast.data import fixed_subset, get_data
    from guard_fast.distill.squeeze import build_criterion
    from guard_fast.models import build_model
    from guard_fast.pipeline import PipelineConfig, resolve_settings

    cfg = PipelineConfig(preset=args.preset, data_root=args.data, smoke=args.smoke, seed=args.seed)
    sq = resolve_squeeze({"preset": cfg.preset, "data_root": cfg.data_root,
                          **resolve_settings(cfg)["squeeze"]})
    data = get_data(sq.data, root=cfg.data_root, image_size=sq.image_size)
    batch = args.batch or (16 if args.smoke else sq.batch_size)
    xs, ys = fixed_subset(data.train, batch, cfg.seed)
    xs, ys = xs.to(device), ys.to(device)
    rows = []
    for reg in REGULARIZERS:
        torch.manual_seed(cfg.seed)
        model = build_model(sq.model, data.num_classes, data.channels, data.mean, data.std,
                            image_size=sq.image_size, **sq.model_options).to(device).train()
        crit = build_criterion(resolve_squeeze({"preset": cfg.preset, "data_root": cfg.data_root,
                                                "regularizer": reg}))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            crit(model, xs, ys).loss.backward()
            opt.step()
        r = time_fn(step, warmup=1, reps=args.reps or (2 if args.smoke else 10), device=device)
        peak = r["peak_mem_mb"] if device.type == "cuda" else peak_tensor_mb(step)
        rows.append({"regularizer": reg, "s_per_iteration": r["median_ms"] / 1e3,
                     "p20_s": r["p20_ms"] / 1e3, "p80_s": r["p80_ms"] / 1e3,
                     "peak_mem_mb": peak, "batch": int(batch), "model": sq.model,
                     "image_size": sq.image_size})
        print(f"table4 {reg}: {r['median_ms']:.0f} ms/iteration, peak {peak:.0f} MB", flush=True)
    return rows, {"model": sq.model, "image_size": sq.image_size, "batch": int(batch)}


def render(rows: list[dict], setting: dict, device: torch.device) -> str:
    """The Table 4 layout: each regularizer's cost and its multiple of plain CE's."""
    base = rows[0]
    lines = [f"# Table 4: squeeze cost per iteration ({setting['model']}, {setting['image_size']} "
             f"px, batch {setting['batch']}, {device.type})", "",
             "| Teacher regularizer | s / iteration | x plain | peak memory (MB) | x plain |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {NAMES[r['regularizer']]} | {r['s_per_iteration']:.3f} | "
                     f"{r['s_per_iteration'] / base['s_per_iteration']:.2f} | "
                     f"{r['peak_mem_mb']:.0f} | "
                     f"{r['peak_mem_mb'] / max(base['peak_mem_mb'], 1e-9):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist", help="pipeline preset (default: mnist, the "
                    "bundled digits; the others need --data)")
    ap.add_argument("--data", default=None, help="your copy of the preset's data set")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--smoke", action="store_true", help="batch 16, 2 timed steps (CI)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: the "
                    "preset's squeeze batch; 16 with --smoke)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps (default 10; 2 with --smoke)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the batch and the models")
    ap.add_argument("--out", default="runs/table4", help="where results.md/.json go")
    ap.add_argument("--results-dir", default=None, help="where table4.jsonl goes (default "
                    "bench/results)")
    args = ap.parse_args(argv)
    from harness import append_result

    from guard_fast.runtime import atomic_write_bytes, atomic_write_json, resolve_device

    device = resolve_device(args.device)
    rows, setting = measure(args, device)
    text = render(rows, setting, device)
    out = Path(args.out)
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_json(out / "results.json", {"rows": rows, "device": str(device)})
    for r in rows:
        append_result("table4", {"area": "table4", **r, "preset": args.preset, "smoke": args.smoke,
                                 "device_type": device.type}, args.results_dir, device=device)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
