"""The trajectory-matching methods of a pipeline run (mtt, tesla, mtt-guard):

    experts (shared per expert regularizer) -> mtt / tesla -> MTT's evaluation training
    -> robust evaluation -> PGD eps sweep

Folders (beside the SRe2L methods' in the pipeline's run folder):
  <teachers or out>/experts_<regularizer>/   the expert buffer (guard_fast.distill.experts),
                                             shared by every method and IPC that uses it
  <method>/mtt/                              the distilled set (guard_fast.distill.mtt)
  <method>/eval/, eps_sweep.json, times.json  as for the other methods

The evaluated network is what MTT and TESLA report: a fresh ConvNet of the buffer's
architecture trained on the synthetic set with the learned step size (SGD momentum 0.9,
weight decay 5e-4, step decay at half, DSA), wrapped to take [0, 1] pixels. Stage seconds go
in the report's columns as squeeze_s (experts), recover_s (distillation), student_s (the
evaluation training).
"""
from __future__ import annotations

import json
from pathlib import Path

from guard_fast.config.methods import TRAJECTORY_METHODS, method_spec
from guard_fast.pipeline.run import _MethodRun
from guard_fast.runtime import (atomic_torch_save, atomic_write_json, barrier, dist_env,
                                resolve_device)

__all__ = ["is_trajectory_method", "run_trajectory_method"]


def is_trajectory_method(name: str) -> bool:
    return name in TRAJECTORY_METHODS


def _sizes(cfg) -> dict:
    from guard_fast.config.mtt import TRAJECTORY_PIPELINE

    if cfg.smoke:
        return TRAJECTORY_PIPELINE["smoke"]
    if cfg.preset in TRAJECTORY_PIPELINE:
        return TRAJECTORY_PIPELINE[cfg.preset]
    raise ValueError(f"the trajectory methods (mtt, tesla, mtt-guard) have pipeline sizes for "
                     f"the bundled digits and Fashion-MNIST only; for --preset {cfg.preset} run "
                     "the experts and mtt stages with their published presets")


class _TrajRun(_MethodRun):
    """One trajectory method's run: _MethodRun's attributes that the shared evaluation steps
    read (root, ev_dir, label, device, timed, log), with the experts and mtt folders instead
    of the squeeze -> student ones."""

    def __post_init__(self):
        self.folder, self.label, spec = method_spec(self.name)
        self.regularizer, self.method = spec["regularizer"], spec["method"]
        self.root = self.out / self.folder
        shared = Path(self.cfg.teachers) if self.cfg.teachers else self.out
        self.buffer = shared / f"experts_{self.regularizer}"
        self.mtt_dir, self.ev_dir = self.root / "mtt", self.root / "eval"
        self.device = resolve_device(self.cfg.device)
        self.sizes = _sizes(self.cfg)


def _experts_stage(m: _TrajRun) -> None:
    from guard_fast.distill.experts import experts

    if (m.buffer / "buffer.json").exists():
        return m.recorded("squeeze_s", m.buffer)
    m.log(f"[{m.label}] experts (regularizer {m.regularizer})")
    over = {**m.sizes["experts"], **m.common(), "regularizer": m.regularizer,
            "out": str(m.buffer), "resume": (m.buffer / "config.json").exists()}
    m.timed("squeeze_s", lambda: experts(over, log=m.log), m.buffer)


def _distill_stage(m: _TrajRun) -> None:
    from guard_fast.config.mtt import trajectory_distill_sizes
    from guard_fast.distill.mtt import mtt

    if (m.mtt_dir / "images.pt").exists():
        return m.recorded("recover_s", m.mtt_dir)
    m.log(f"[{m.label}] {m.method} (ipc {m.p['ipc']})")
    over = {**trajectory_distill_sizes(m.sizes, m.p["ipc"]), **m.common(), "method": m.method, "ipc": m.p["ipc"],
            "buffer": str(m.buffer), "out": str(m.mtt_dir),
            "resume": (m.mtt_dir / "config.json").exists()}
    m.timed("recover_s", lambda: mtt(over), m.mtt_dir)


def _eval_network(m: _TrajRun):
    """MTT's evaluation network trained on the distilled set, taking [0, 1] pixels (trained
    once; saved as eval_net.pt with its input space)."""
    from guard_fast.data.trajectories import build_net, space_of
    from guard_fast.distill.mtt import evaluate_synthetic
    from guard_fast.runtime import load_checkpoint

    syn = load_checkpoint(m.mtt_dir / "synthetic.pt")
    space = space_of({"mean": syn["mean"], "std": syn["std"]}, syn["zca"])
    path = m.root / "eval_net.pt"
    if path.exists():
        net = build_net(syn["arch"])
        net.load_state_dict(load_checkpoint(path)["state_dict"])
    else:
        m.log(f"[{m.label}] evaluation network ({m.sizes['eval_epochs']} epochs, lr "
              f"{syn['lr']:.4g})")
        labels = syn["soft_labels"] if syn["soft_labels"] is not None else syn["labels"]
        net = m.timed("student_s", lambda: evaluate_synthetic(
            syn["images"], labels, syn["lr"], syn["arch"], epochs=m.sizes["eval_epochs"],
            seed=m.cfg.seed, device=m.device)).cpu()
        atomic_torch_save(path, {"state_dict": net.state_dict(), "arch": syn["arch"]})
    model = space.pixel_model(net).to(m.device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, syn["arch"]


def run_trajectory_method(name: str, cfg, p: dict, out: Path, log=print) -> dict:
    """Every stage of one trajectory method (completed stages skipped); returns its row of
    the pipeline summary (the shape run_method's rows have; no teacher, so its fields are
    empty but for the experts' mean validation accuracy)."""
    from guard_fast.pipeline.run import _eval_sets, _evaluate_stage, _sweep_stage

    m = _TrajRun(name, cfg, p, Path(out), log)
    rank = dist_env()[0]
    barrier()
    _experts_stage(m)   # every rank: experts are shared out under torchrun
    barrier()
    if rank == 0:
        _distill_stage(m)
    barrier()
    model, arch = _eval_network(m) if rank == 0 else (None, None)
    sets = _eval_sets(m, {"data": _data_name(m), "image_size": arch["image_size"],
                          "in_channels": arch["channels"]}) if rank == 0 else (None, None)
    res = _evaluate_stage(m, model, sets, rank)
    sweep = _sweep_stage(m, model, sets, res, rank)
    tf = m.root / "times.json"
    times = {**(json.loads(tf.read_text()) if tf.exists() else {}), **m.times}
    if rank == 0:
        atomic_write_json(tf, times)
    buf = json.loads((m.buffer / "run.json").read_text())
    return {"method": m.folder, "name": m.label, "result": res, "sweep": sweep, "times": times,
            "teacher_val_acc": buf.get("val_acc_mean"), "teacher": {},
            "teacher_grad_ratio": [], "teacher_val_penalty": None,
            "teacher_acc_on_recovered": None}


def _data_name(m: _TrajRun) -> str:
    return json.loads((m.buffer / "buffer.json").read_text())["meta"]["data"]


def trajectory_part(base, root: Path, k: int, methods=tuple(TRAJECTORY_METHODS),
                    log=print) -> tuple[dict, list]:
    """Table 2's trajectory rows at IPC k: one pipeline run of methods under
    root/trajectory_ipc<k> with the experiment's settings (base) and shared buffers. Returns
    its summary and its tables: beside IPC k's SRe2L and GUARD rows when root/ipc<k> holds
    them with the same seeds, so that with seeds the trajectory rows get paired differences
    to SRe2L and to GUARD; else on their own."""
    import dataclasses

    from guard_fast.evaluate import results_tables
    from guard_fast.pipeline.experiments import GUARD_EXACT
    from guard_fast.pipeline.run import run_pipeline

    c = dataclasses.replace(base, methods=tuple(methods), ipc=k,
                            out=str(root / f"trajectory_ipc{k}"))
    summary = run_pipeline(c, log=log)
    shown = dict(summary)
    part = root / f"ipc{k}" / "results.json"
    beside = json.loads(part.read_text()) if part.exists() else None
    if beside is not None and beside.get("seeds") == summary.get("seeds"):
        shown.update(rows=[*beside["rows"], *summary["rows"]], reference="sre2l",
                     also_against=[GUARD_EXACT])
    return summary, [f"### IPC {k}", "", *results_tables(shown), ""]


def add_table2_rows(cfg, base, root: Path, text: str, log=print,
                    write_to: Path | None = None) -> str:
    """Table 2's trajectory rows: MTT, TESLA and MTT + GUARD experts at IPC 10 and 50 (1 in
    the smoke setting; cfg.ipc alone when the experiment was given --ipc), each IPC one
    trajectory_part; their rows are added to root/results.json and results.md (text: the
    table so far; written to write_to, root by default). Returns the new text."""
    from guard_fast.pipeline.experiments import table2_ipcs
    from guard_fast.runtime import atomic_write_bytes

    dest = Path(write_to or root)
    js = json.loads((dest / "results.json").read_text())
    lines = ["", "## Trajectory matching", "",
             "MTT's ConvNet trained on each synthetic set with its learned step size (MTT's "
             "evaluation); GUARD experts: experts trained with GUARD's penalty. Each IPC's "
             "SRe2L and GUARD rows are repeated beside them for the paired differences.", ""]
    for k in table2_ipcs(cfg):
        summary, tables = trajectory_part(base, root, k, log=log)
        part = f"trajectory IPC {k}"
        js.setdefault("parts", []).append({"part": part, "folder": f"trajectory_ipc{k}",
                                           "summary": summary})
        js["rows"] += [{"part": part, "name": f"{r['name']} (IPC {k})", "method": r["method"],
                        **{x: r[x] for x in r if x not in ("name", "method")}}
                       for r in summary["rows"]]
        lines += tables
    atomic_write_json(dest / "results.json", js)
    text += "\n".join(lines) + "\n"
    atomic_write_bytes(dest / "results.md", text.encode())
    return text
