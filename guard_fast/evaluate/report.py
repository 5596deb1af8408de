"""Tables and plots of robust-evaluation results, for one evaluation and for a pipeline run.

One evaluation (robust_eval's result): format_table (the paper's Table 2 layout),
plot_eps_sweep (accuracy vs eps per attack), write_outputs (results.json, table.md,
eps_sweep.png). A pipeline run (its results.json, see guard_fast.pipeline): render_report
re-renders results.md and eps_sweep.png (PGD-100 accuracy vs eps, one line per method).
Both plots are drawn by one function, and every file is written atomically.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from guard_fast.attacks.protocols import TABLE_COLUMNS
from guard_fast.evaluate.stats import INTERVAL_METHOD, binomial_se, mean_std, paired_diff
from guard_fast.runtime import atomic_write_bytes

__all__ = ["format_table", "plot_eps_sweep", "write_outputs", "render_report",
           "pipeline_report", "results_tables"]


# ----------------------------------------------------------------------------- tables
def _row_values(row: Mapping[str, Any]) -> Tuple[str, Dict[str, float]]:
    if "attacks" in row and "clean" in row:
        name = row.get("name") or f"{row.get('protocol', '?')} eps={row.get('eps_255', 0):g}/255"
        vals = {"Clean": row["clean"]["acc"]}
        vals.update({k: v["acc"] for k, v in row["attacks"].items()})
        return str(name), vals
    name = str(row.get("name", ""))
    return name, {k: float(v) for k, v in row.items() if k != "name"}


def format_table(rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None
                 ) -> str:
    """Markdown table, one row per evaluation, columns as the paper's Table 2 attack rows:
    Clean, PGD100, Square, AutoAttack, CW, MIM (then any further attacks).

    Each row is a robust_eval result (optionally with a "name") or a flat mapping
    {"name": ..., "Clean": 91.2, "PGD100": 40.1, ...}. Missing values print as "-".
    """
    parsed = [_row_values(r) for r in rows]
    if columns is None:
        columns = ["Clean", *TABLE_COLUMNS]
        for _, vals in parsed:
            columns += [k for k in vals if k not in columns]
    lines = ["| Model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, vals in parsed:
        cells = [f"{vals[c]:.2f}" if c in vals and vals[c] == vals[c] else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _plot_accuracy_vs_eps(path: str | Path, lines: Sequence[Tuple],
                          ylabel: str, title: str,
                          hline: Optional[Tuple[str, float]] = None) -> None:
    """PNG of accuracy (%, 0-100) against eps (x 1/255): one marked line per (label, eps_255
    values, accuracies[, error bars]), and an optional dashed reference line (label,
    accuracy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys, *err in lines:
        if err and err[0] is not None:
            ax.errorbar(xs, ys, yerr=err[0], marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], color="gray", linestyle="--", label=hline[0])
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_eps_sweep(result: Mapping[str, Any], path: str) -> None:
    """PNG of accuracy (%) vs eps (in 1/255 units), one line per attack, clean dashed."""
    sweep = result["sweep"] or [{"eps": result["eps"], "eps_255": result["eps_255"],
                                 "attacks": result["attacks"]}]
    xs = [s["eps_255"] for s in sweep]
    lines = [(name, xs, [s["attacks"][name]["acc"] for s in sweep]) for name in result["attacks"]]
    _plot_accuracy_vs_eps(path, lines, "accuracy (%)",
                          f"{result['protocol']}, {result['n_examples']} examples",
                          hline=("Clean", result["clean"]["acc"]))


def _plot_pipeline_sweep(summary: Mapping[str, Any], path: Path) -> None:
    """PGD-100 accuracy vs eps, one line per method of a pipeline run, starting at eps 0 (no
    perturbation: the clean accuracy); with seeds, the mean over seeds with +- one std error
    bars."""
    lines = []
    for r in summary["rows"]:
        runs = r.get("per_seed") or [r]
        sw = runs[0]["sweep"]["sweep"]
        accs = [[run["sweep"]["clean"]["acc"]] + [e["attacks"]["PGD100"]["acc"]
                                                  for e in run["sweep"]["sweep"]] for run in runs]
        stats = [mean_std(col) for col in zip(*accs)]
        err = [sd for _, sd in stats] if len(runs) > 1 else None
        lines.append((f"{r['name']} (clean {stats[0][0]:.1f})", [0.0] + [e["eps_255"] for e in sw],
                      [m for m, _ in stats], err))
    seeds = f", {len(summary['seeds'])} seeds (mean +- std)" if summary.get("seeds") else ""
    _plot_accuracy_vs_eps(path, lines, "PGD-100 accuracy (%)",
                          f"students on {summary['preset']} distilled sets, IPC {summary['ipc']}{seeds}")


# ----------------------------------------------------------------------------- files
def write_outputs(result: Mapping[str, Any], out_dir: str) -> Dict[str, str]:
    """results.json, table.md and (with a sweep) eps_sweep.png in out_dir, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "table": os.path.join(out_dir, "table.md")}
    atomic_write_bytes(paths["json"], (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(paths["table"], format_table([result]).encode())
    if result.get("sweep"):
        paths["plot"] = os.path.join(out_dir, "eps_sweep.png")
        plot_eps_sweep(result, paths["plot"])
    return paths


# ----------------------------------------------------------------------------- pipeline runs
def _fmt(v: Optional[float], pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.0f}"


def _stage_table(rows: Sequence[Mapping[str, Any]]) -> list:
    """Seconds per stage, one line per method (a seeded run: summed over its seeds): each
    stage's wall time over all its attempts, a teacher shared by methods counted in each."""
    keys = ("squeeze_s", "recover_s", "relabel_s", "student_s", "eval_s", "sweep_s",
            "teacher_eval_s")
    lines = ["| Method | squeeze s | recover s | relabel s | student s | eval s | sweep s | "
             "teacher eval s |", "|---|" + "---:|" * len(keys)]
    for r in rows:
        runs = r.get("per_seed") or [r]
        cells = []
        for k in keys:
            vals = [run["times"].get(k) for run in runs]
            cells.append(_fmt(sum(vals)) if all(v is not None for v in vals) else "-")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return ["Seconds per stage (wall time over all attempts of a resumed stage; a teacher "
            "shared by several methods appears in each of their rows):", "", *lines]


def _sweep_table(rows: Sequence[Mapping[str, Any]]) -> list:
    """PGD-100 accuracy per eps, one line per method (mean over seeds)."""
    points = (rows[0].get("per_seed") or [rows[0]])[0]["sweep"]["sweep"]
    lines = ["PGD-100 accuracy (%) by eps (x 1/255):", "",
             "| Method | " + " | ".join(f"{e['eps_255']:g}" for e in points) + " |",
             "|---|" + "---:|" * len(points)]
    for r in rows:
        runs = r.get("per_seed") or [r]
        cols = zip(*[[e["attacks"]["PGD100"]["acc"] for e in run["sweep"]["sweep"]]
                     for run in runs])
        lines.append(f"| {r['name']} | " + " | ".join(
            _mean_cell([*c]) for c in cols) + " |")
    return lines


def _columns(run: Mapping[str, Any]) -> Dict[str, Tuple[float, int]]:
    """{column: (accuracy %, images)} of one run's row: the student's evaluation, then the
    teacher's clean and PGD-100 accuracy and validation penalty (penalty: images 0)."""
    res = run["result"]
    cols = {"Clean": (res["clean"]["acc"], res["clean"]["total"])}
    cols.update({k: (v["acc"], v["total"]) for k, v in res["attacks"].items()})
    t = run.get("teacher") or {}
    if t:
        cols["Teacher clean"] = (t["clean"]["acc"], t["clean"]["total"])
        cols["Teacher PGD100"] = (t["PGD100"]["acc"], t["PGD100"]["total"])
    if run.get("teacher_val_penalty") is not None:
        cols["Teacher penalty"] = (run["teacher_val_penalty"], 0)
    return cols


def _column_order(rows: Sequence[Mapping[str, Any]]) -> list:
    order = ["Clean", *TABLE_COLUMNS]
    for r in rows:
        for run in r.get("per_seed") or [r]:
            order += [k for k in _columns(run) if k not in order]
    present = {k for r in rows for run in (r.get("per_seed") or [r]) for k in _columns(run)}
    return [c for c in order if c in present]


def _mean_cell(values: Sequence[float]) -> str:
    m, sd = mean_std(values)
    return f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"


def _single_seed_table(rows: Sequence[Mapping[str, Any]]) -> list:
    """One run per method: each accuracy with its binomial standard error over images."""
    cols = _column_order(rows)
    lines = ["| Method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        c = _columns(r)
        cells = []
        for k in cols:
            if k not in c:
                cells.append("-")
            elif c[k][1] == 0:      # not an accuracy (the penalty)
                cells.append(f"{c[k][0]:.3g}")
            else:
                cells.append(f"{c[k][0]:.1f} ± {binomial_se(*c[k]):.1f}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def _seeded_tables(rows: Sequence[Mapping[str, Any]], references: Sequence[str]) -> list:
    """Mean ± std over seeds per method; then, for each reference method present, every
    other method minus it, paired by seed, with its 95% interval (the significant ones
    marked)."""
    cols = _column_order(rows)
    per = [[_columns(run) for run in r["per_seed"]] for r in rows]
    lines = ["| Method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r, runs in zip(rows, per):
        cells = [_mean_cell([c[k][0] for c in runs]) if all(k in c for c in runs) else "-"
                 for k in cols]
        if "Teacher penalty" in cols:
            i = cols.index("Teacher penalty")
            vals = [c["Teacher penalty"][0] for c in runs if "Teacher penalty" in c]
            cells[i] = f"{mean_std(vals)[0]:.3g}" if vals else "-"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    acc_cols = [k for k in cols if k != "Teacher penalty"]
    for reference in references:
        ref = next((i for i, r in enumerate(rows) if r["method"] == reference), None)
        if ref is None:
            continue
        lines += ["", f"Difference to {rows[ref]['name']} (percentage points, paired by seed; "
                  f"{INTERVAL_METHOD}):", "",
                  "| Method | " + " | ".join(acc_cols) + " |", "|---|" + "---:|" * len(acc_cols)]
        for i, (r, runs) in enumerate(zip(rows, per)):
            if i == ref:
                continue
            cells = []
            for k in acc_cols:
                a = [c[k][0] for c in runs if k in c]
                b = [c[k][0] for c in per[ref] if k in c]
                cells.append(paired_diff(a, b).format() if len(a) == len(b) == len(runs)
                             else "-")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines


def _images_note(summary: Mapping[str, Any]) -> str:
    rows = summary["rows"]
    run = (rows[0].get("per_seed") or [rows[0]])[0]
    res = run["result"]
    n_main = res["clean"]["total"]
    n_costly = res.get("costly_examples")
    where = (f"clean and PGD-100 on {n_main} real validation images, the other attacks on a "
             f"class-stratified subset of {n_costly}" if n_costly and n_costly != n_main else
             f"{n_main} real validation images (class-stratified)")
    return where


def grad_ratio_table(rows: Sequence[Mapping[str, Any]]) -> list:
    """The teachers' regularizer-to-CE parameter-gradient norm ratio at the logged steps
    (squeeze --grad-ratio-steps; mean over seeds), one line per method that logged it."""
    logged = []
    for r in rows:
        runs = r.get("per_seed") or [r]
        by_step: Dict[int, list] = {}
        for run in runs:
            for e in run.get("teacher_grad_ratio") or []:
                by_step.setdefault(int(e["step"]), []).append(float(e["grad_ratio"]))
        if by_step and any(v for vals in by_step.values() for v in vals):
            logged.append((r["name"], by_step))
    if not logged:
        return []
    steps = sorted({s for _, b in logged for s in b})
    lines = ["Teacher training: ||grad_theta regularizer|| / ||grad_theta CE|| at step "
             "(mean over seeds):", "",
             "| Method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name, b in logged:
        lines.append(f"| {name} | " + " | ".join(
            f"{mean_std(b[s])[0]:.3g}" if s in b else "-" for s in steps) + " |")
    return lines


def results_tables(summary: Mapping[str, Any]) -> list:
    """The accuracy tables of a pipeline (or experiment) summary: with one seed each
    accuracy +- its standard error over images; with seeds mean +- std and the paired
    differences to the reference method (summary["reference"], SRe2L by default) and to
    each method of summary["also_against"]."""
    rows = summary["rows"]
    seeds = summary.get("seeds")
    head = (f"Accuracy (%) of each student and its teacher, {_images_note(summary)}, protocol "
            f"{summary['protocol']}, eps = {summary['eps_255']:g}/255")
    ratio = grad_ratio_table(rows)
    ratio = ["", *ratio] if ratio else []
    if seeds:
        return [head + f"; mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}). "
                "Teacher penalty: the teacher's validation GUARD penalty (mean).", "",
                *_seeded_tables(rows, [summary.get("reference", "sre2l"),
                                       *summary.get("also_against", ())]), *ratio]
    return [head + "; ± one binomial standard error over the images. Teacher penalty: the "
            "teacher's validation GUARD penalty.", "", *_single_seed_table(rows), *ratio]


def pipeline_report(summary: Mapping[str, Any]) -> str:
    """The markdown report of a pipeline run's summary (its results.json): the accuracy
    tables, the stage table and the PGD-100 eps sweep."""
    seeds = summary.get("seeds")
    how = ("" if seeds else "One seed: for mean ± std over seeds and paired 95% intervals, "
           "rerun with `--seeds 3` (a new --out).")
    lines = [f"# guard_fast pipeline: {summary['preset']}"
             + (" (smoke setting)" if summary.get("smoke") else ""), "",
             f"IPC {summary['ipc']}.", "", *results_tables(summary), "", how, "",
             *_stage_table(summary["rows"]), "",
             *_sweep_table(summary["rows"]), "",
             "Files: grid_<method>.png (distilled sets), eps_sweep.png, <method>/ (every "
             "stage's run folder)" + ("; seed<k>/ (each seed's pipeline run)." if seeds else "."),
             ""]
    return "\n".join(lines)


def render_report(run_dir: str | Path) -> str:
    """Re-render results.md and eps_sweep.png of a pipeline run from its results.json."""
    run_dir = Path(run_dir)
    f = run_dir / "results.json"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir} holds no pipeline results (no results.json): run "
                                "python -m guard_fast.train (or train all) first")
    summary = json.loads(f.read_text())
    text = pipeline_report(summary)
    atomic_write_bytes(run_dir / "results.md", text.encode())
    _plot_pipeline_sweep(summary, run_dir / "eps_sweep.png")
    return text
