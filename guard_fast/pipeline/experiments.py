"""The paper's experiments as pipeline runs, each writing <out>/results.md and results.json:

  table1  GUARD vs SRe2L vs SRe2L + PGD adversarial training of the teacher
  table2  GUARD vs SRe2L at IPC 1, 10, 50; MTT, TESLA, MTT + GUARD experts at IPC 10, 50
  table3  gradient-norm regularization lambda_g = 1e-4 .. 1 against GUARD
  table5  SRe2L, CDA and DC, each with and without GUARD

Teachers are shared between the runs of an experiment (and between experiments given the
same cfg.teachers). Table 4 (time per squeeze iteration and peak memory) is a measurement,
not a pipeline run: it is bench/bench_table4.py.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from guard_fast.config.pipeline import PipelineConfig, resolve_settings
from guard_fast.pipeline.run import run_pipeline
from guard_fast.runtime import atomic_write_bytes, atomic_write_json, resolve_device

__all__ = ["EXPERIMENTS", "BENCH_EXPERIMENTS", "run_experiment"]

EXPERIMENTS = {
    "table1": "GUARD vs SRe2L vs SRe2L + PGD adversarial training (teacher eps 1/255)",
    "table2": "GUARD vs SRe2L at IPC 1, 10, 50",
    "table3": "gradient-norm regularization lambda_g = 1e-4 .. 1 against GUARD",
    "table4": "time per squeeze iteration and peak memory: GUARD vs adversarial training "
              "(a bench: python bench/bench_table4.py)",
    "table5": "SRe2L, CDA and DC, each with and without GUARD",
}
# experiments that are measurements: name -> the command that runs them
BENCH_EXPERIMENTS = {
    "table4": "python bench/bench_table4.py [--preset P --data PATH] [--device cuda] "
              "[--smoke] --out DIR",
}


def _combine(out: Path, title: str, parts: list[tuple[str, Path]], note: str = "") -> str:
    """One table from several pipeline runs: rows prefixed by each part's tag."""
    from guard_fast.evaluate import format_table

    rows, js = [], []
    for tag, d in parts:
        s = json.loads((d / "results.json").read_text())
        for r in s["rows"]:
            rows.append(dict(r["result"], name=f"{r['name']}{tag}"))
            js.append({"part": tag.strip(), "name": r["name"], "result": r["result"],
                       "times": r["times"], "teacher_val_acc": r["teacher_val_acc"]})
        proto, eps255, n = s["protocol"], s["eps_255"], s["eval_examples"]
    text = (f"# {title}\n\n{note}Student accuracy (%) on {n or 'all'} real validation images, "
            f"protocol {proto}, eps = {eps255:g}/255.\n\n" + format_table(rows))
    atomic_write_bytes(out / "results.md", text.encode())
    atomic_write_json(out / "results.json", {"title": title, "rows": js})
    return text


def _dc_rows(cfg: PipelineConfig, p: dict, out: Path, log) -> list:
    """DC with and without GUARD on the bundled digits: distill, train DC's ConvNet on the
    synthetic set (hard labels, DC's evaluation), evaluate it like the students."""
    from guard_fast.config import DCConfig
    from guard_fast.data import fixed_subset, get_data
    from guard_fast.data.distilled import load_distilled
    from guard_fast.distill.dc import train_epochs, dc
    from guard_fast.evaluate import robust_eval
    from guard_fast.models import build_model

    device = resolve_device(cfg.device)
    small = cfg.smoke
    rows = []
    for reg, label in (("none", "DC"), ("guard", "DC + GUARD")):
        d = out / f"dc_{reg}"
        if not (d / "images.pt").exists():
            log(f"[{label}] DC distillation")
            dc(DCConfig(data="mnist", ipc=1, iterations=1 if small else 40, outer_loop=1,
                        inner_loop=1, batch_real=16 if small else 64, width=32,
                        regularizer=reg, out=str(d), device=cfg.device, seed=cfg.seed,
                        progress=cfg.progress, resume=(d / "config.json").exists()))
        s = load_distilled(d)
        data = get_data("mnist", image_size=s["images"].shape[-1])
        ev = d / "eval"
        if not (ev / "results.json").exists():
            torch.manual_seed(cfg.seed)
            net = build_model("convnet", 10, s["images"].shape[1], data.mean, data.std,
                              image_size=s["images"].shape[-1], width=32).to(device)
            gen = torch.Generator().manual_seed(cfg.seed)
            epochs = 5 if small else 300
            train_epochs(net, s["images"].to(device), s["labels"].to(device), epochs, 256,
                          0.01, 0.9, 5e-4, gen, decay_at=epochs // 2)
            net.eval()
            val = fixed_subset(data.val, p["eval_examples"], cfg.seed)
            robust_eval(net, val, protocol=cfg.protocol, eps=p["eps"], batch_size=256,
                        seed=cfg.seed, out_dir=str(ev), device=device, progress=cfg.progress)
        rows.append({"name": label, "result": json.loads((ev / "results.json").read_text()),
                     "times": {}, "teacher_val_acc": None})
    return rows


def _table1(cfg: PipelineConfig, base: PipelineConfig, root: Path, log) -> str:
    c = dataclasses.replace(base, methods=("sre2l", "sre2l-adv", "guard"), out=str(root / "run"))
    run_pipeline(c, log=log)
    return _combine(root, EXPERIMENTS["table1"], [("", Path(c.out))])


def _table2(cfg: PipelineConfig, base: PipelineConfig, root: Path, log) -> str:
    parts = []
    for k in ((1,) if cfg.smoke else (1, 10, 50)):
        c = dataclasses.replace(base, ipc=k, out=str(root / f"ipc{k}"))
        run_pipeline(c, log=log)
        parts.append((f" (IPC {k})", Path(c.out)))
    from guard_fast.pipeline.trajectory import add_table2_rows

    return add_table2_rows(cfg, base, root, _combine(root, EXPERIMENTS["table2"], parts), log)


def _table3(cfg: PipelineConfig, base: PipelineConfig, root: Path, log) -> str:
    lams = ("1e-2",) if cfg.smoke else ("1e-4", "1e-3", "1e-2", "1e-1", "1")
    c = dataclasses.replace(base, methods=("guard", *[f"gr:{v}" for v in lams]),
                            out=str(root / "run"))
    run_pipeline(c, log=log)
    return _combine(root, EXPERIMENTS["table3"], [("", Path(c.out))])


def _table5(cfg: PipelineConfig, base: PipelineConfig, root: Path, log) -> str:
    from guard_fast.evaluate import format_table

    parts = []
    for rm in ("sre2l", "cda"):
        c = dataclasses.replace(base, recover_method=rm, out=str(root / rm))
        run_pipeline(c, log=log)
        parts.append((" (CDA recover)" if rm == "cda" else "", Path(c.out)))
    text = _combine(root, EXPERIMENTS["table5"], parts,
                    note="SRe2L rows: SRe2L recover; CDA rows: CDA's crop curriculum. ")
    dc_rows = _dc_rows(cfg, resolve_settings(cfg), root, log)
    js = json.loads((root / "results.json").read_text())
    js["rows"] += [{"part": "dc", **r} for r in dc_rows]
    atomic_write_json(root / "results.json", js)
    text += ("\nDC rows (IPC 1, DC's ConvNet trained on the synthetic set with hard labels):"
             "\n\n" + format_table([dict(r["result"], name=r["name"]) for r in dc_rows]))
    atomic_write_bytes(root / "results.md", text.encode())
    return text


_RUNS = {"table1": _table1, "table2": _table2, "table3": _table3, "table5": _table5}


def run_experiment(name: str, cfg: PipelineConfig, out: str | None = None, log=print) -> str:
    """One of the paper's experiments (EXPERIMENTS) on cfg's data; writes <out>/results.md
    and returns its text. A bench experiment (BENCH_EXPERIMENTS) is refused with its command."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    if name in BENCH_EXPERIMENTS:
        raise ValueError(f"{name} is a measurement, not a pipeline run: from the repository, "
                         f"run {BENCH_EXPERIMENTS[name]}")
    root = Path(out or f"runs/{name}")
    root.mkdir(parents=True, exist_ok=True)
    base = dataclasses.replace(cfg, teachers=cfg.teachers or str(root / "teachers"))
    text = _RUNS[name](cfg, base, root, log)
    log(text)
    return text
