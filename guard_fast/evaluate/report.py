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
from guard_fast.runtime import atomic_write_bytes

__all__ = ["format_table", "plot_eps_sweep", "write_outputs", "render_report",
           "pipeline_report"]


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
def _plot_accuracy_vs_eps(path: str | Path, lines: Sequence[Tuple[str, Sequence[float],
                                                                  Sequence[float]]],
                          ylabel: str, title: str,
                          hline: Optional[Tuple[str, float]] = None) -> None:
    """PNG of accuracy (%, 0-100) against eps (x 1/255): one marked line per (label, eps_255
    values, accuracies), and an optional dashed reference line (label, accuracy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys in lines:
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
    """PGD-100 accuracy vs eps, one line per method of a pipeline run."""
    lines = []
    for r in summary["rows"]:
        sw = r["sweep"]["sweep"]
        lines.append((f"{r['name']} (clean {r['sweep']['clean']['acc']:.1f})",
                      [e["eps_255"] for e in sw], [e["attacks"]["PGD100"]["acc"] for e in sw]))
    _plot_accuracy_vs_eps(path, lines, "PGD-100 accuracy (%)",
                          f"students on {summary['preset']} distilled sets, IPC {summary['ipc']}")


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
    """Teacher accuracies and seconds per stage, one line per method."""
    lines = ["| Method | teacher val acc | teacher acc on its recovered images | "
             "squeeze s | recover s | relabel s | student s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["times"]
        lines.append(f"| {r['name']} | {_fmt(r['teacher_val_acc'], True)} | "
                     f"{_fmt(r['teacher_acc_on_recovered'], True)} | {_fmt(t.get('squeeze_s'))} | "
                     f"{_fmt(t.get('recover_s'))} | {_fmt(t.get('relabel_s'))} | "
                     f"{_fmt(t.get('student_s'))} | {_fmt(t.get('eval_s'))} |")
    return lines


def _sweep_table(rows: Sequence[Mapping[str, Any]]) -> list:
    """PGD-100 accuracy per eps, one line per method."""
    points = rows[0]["sweep"]["sweep"]
    lines = ["PGD-100 accuracy (%) by eps (x 1/255):", "",
             "| Method | " + " | ".join(f"{e['eps_255']:g}" for e in points) + " |",
             "|---|" + "---:|" * len(points)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{e['attacks']['PGD100']['acc']:.1f}" for e in r["sweep"]["sweep"]) + " |")
    return lines


def pipeline_report(summary: Mapping[str, Any]) -> str:
    """The markdown report of a pipeline run's summary (its results.json): the Table 2
    layout, the stage table and the PGD-100 eps sweep."""
    rows = [dict(r["result"], name=r["name"]) for r in summary["rows"]]
    lines = [f"# guard_fast pipeline: {summary['preset']}"
             + (" (smoke setting)" if summary.get("smoke") else ""), "",
             f"Student accuracy (%) on {summary['eval_examples'] or 'all'} real validation "
             f"images, protocol {summary['protocol']}, eps = {summary['eps_255']:g}/255, "
             f"IPC {summary['ipc']}.", "",
             format_table(rows), "",
             *_stage_table(summary["rows"]), "",
             *_sweep_table(summary["rows"]), "",
             "Files: grid_<method>.png (distilled sets), eps_sweep.png, <method>/ (every "
             "stage's run folder).", ""]
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
