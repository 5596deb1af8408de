"""End-to-end driver timing: the whole pipeline (plain SRe2L and GUARD teachers; squeeze,
recover, relabel, student, robust evaluation) on a reduced ImageNette-shaped run over
synthetic JPEG files (10 classes), stage by stage: wall time and images/s.

    python bench/bench_e2e.py --device cuda           # 224 px, ResNet-18 (the GPU suite)
    python bench/bench_e2e.py --quick                 # CPU smoke: 32 px, a few images

The sizes are reduced on purpose (one measurement of the driver's overheads and stage costs,
not a distillation result); rows go to bench/results/e2e.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--per-class", type=int, default=None, help="JPEGs per class and split")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    from harness import append_result

    from guard_fast.data import write_synthetic_imagefolder
    from guard_fast.runtime import resolve_device
    from guard_fast.pipeline import PipelineConfig, run_pipeline

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = 224 if cuda else 32
    per_class = args.per_class or (100 if cuda else 4)
    # the CPU smoke form (what tests/test_gpu_suite.py runs) uses a width-8 ConvNet: it checks
    # that every stage runs and reports, the GPU form measures the preset's ResNet-18
    net = {} if cuda else {"model": "convnet", "model_options": {"width": 8, "norm": "batchnorm"}}
    sizes = dict(
        squeeze=dict(epochs=1, image_size=size, batch_size=32 if cuda else 16, max_val=64, **net),
        recover=dict(iterations=50 if cuda else 3, group_size=1),
        student=dict(epochs=5 if cuda else 1, batch_size=50 if cuda else 10, image_size=size, **net),
        ipc=10 if cuda else 1, eval_examples=100 if cuda else 2, square_queries=100 if cuda else 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        write_synthetic_imagefolder(str(root), 10, per_class, 256 if cuda else 48)
        t_data = time.perf_counter() - t0
        cfg = PipelineConfig(preset="imagenette", data_root=str(root), out=str(Path(tmp) / "run"),
                             ipc=sizes["ipc"], eval_examples=sizes["eval_examples"],
                             square_queries=sizes["square_queries"], squeeze=sizes["squeeze"],
                             sweep=None if cuda else (),
                             recover=sizes["recover"], student=sizes["student"],
                             device=str(device), progress=False)
        t0 = time.perf_counter()
        s = run_pipeline(cfg, log=lambda *a: print(*a, flush=True))
        total = time.perf_counter() - t0
    n_train = 10 * per_class
    for r in s["rows"]:
        t = r["times"]
        imgs = {"squeeze_s": n_train, "recover_s": sizes["recover"]["iterations"] * 10 * sizes["ipc"],
                "relabel_s": sizes["student"]["epochs"] * 10 * sizes["ipc"],
                "student_s": sizes["student"]["epochs"] * 10 * sizes["ipc"],
                "eval_s": sizes["eval_examples"]}
        for stage, sec in t.items():
            row = {"area": "e2e", "method": r["method"], "stage": stage.replace("_s", ""),
                   "seconds": sec, "device_type": device.type, "image_size": size,
                   "images_per_s": imgs.get(stage, 0) / sec if sec and stage in imgs else None,
                   "quick": args.quick}
            append_result("e2e", row, args.results_dir, device=device)
            ips = f"{row['images_per_s']:.1f} img/s" if row["images_per_s"] else ""
            print(f"{r['method']:6s} {row['stage']:8s} {sec:8.1f} s  {ips}")
    append_result("e2e", {"area": "e2e", "stage": "total", "seconds": total,
                          "data_write_s": t_data, "device_type": device.type,
                          "image_size": size, "quick": args.quick}, args.results_dir, device=device)
    print(f"total {total:.1f} s (+ {t_data:.1f} s writing the synthetic JPEGs)")
    print(json.dumps({"total_s": total}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
