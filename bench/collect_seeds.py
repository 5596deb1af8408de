"""Snapshot a seeded experiment, finished or still running, and print its paired table.

    python bench/collect_seeds.py runs/table1 bench/results/stats/table1_mnist \
        --pair guard sre2l --pair guard real_guard

Reads every complete student evaluation (<exp>/run/seed<k>/<method>/eval/results.json) and
every teacher's PGD-100 file (<exp>/teachers/seed<k>/<teacher>/squeeze/robust_*.json),
copies them with the teachers' per-epoch metrics and gradient ratios to OUT/seed<k>/, and
prints mean ± std over the seeds that have the row, and for each pair (a, b) the paired
difference over the seeds both have, with its 95% t interval (guard_fast.evaluate.stats;
`*`: the interval excludes zero). A running experiment is only read: rows appear as their
seeds complete, so the output says per row how many seeds it holds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from guard_fast.evaluate.stats import INTERVAL_METHOD, mean_std, paired_diff

TEACHER_FILES = ("metrics.jsonl", "grad_ratio.jsonl")


def _accs(res: dict) -> dict:
    """Clean and per-attack accuracy of a student's results.json or a teacher's robust_*.json
    (which holds its attacks at the top level)."""
    attacks = res.get("attacks") or {k: v for k, v in res.items()
                                      if isinstance(v, dict) and "acc" in v and k != "clean"}
    return {"Clean": res["clean"]["acc"], **{k: v["acc"] for k, v in attacks.items()}}


def collect(exp: Path, dest: Path | None) -> dict:
    """{row name: {seed: {metric: accuracy}}} for students and teachers ("teacher:<name>")."""
    rows: dict = {}
    for seed_dir in sorted((exp / "run").glob("seed*")):
        k = int(seed_dir.name[4:])
        for f in sorted(seed_dir.glob("*/eval/results.json")):
            method = f.parent.parent.name
            rows.setdefault(method, {})[k] = _accs(json.loads(f.read_text()))
            if dest is not None:
                shutil.copy2(f, _mk(dest / seed_dir.name / method) / "student_eval.json")
    for seed_dir in sorted((exp / "teachers").glob("seed*")):
        k = int(seed_dir.name[4:])
        for sq in sorted(seed_dir.glob("*/squeeze")):
            if not (sq / "teacher.pt").exists():  # still training
                continue
            d = _mk(dest / seed_dir.name / sq.parent.name) if dest is not None else None
            for name in TEACHER_FILES:
                if d is not None and (sq / name).exists():
                    shutil.copy2(sq / name, d / f"teacher_{name}")
            robust = sorted(sq.glob("robust_*.json"))
            if robust:
                rows.setdefault(f"teacher:{sq.parent.name}", {})[k] = _accs(
                    json.loads(robust[-1].read_text()))
                if d is not None:
                    shutil.copy2(robust[-1], d / "teacher_eval.json")
    return rows


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def table(rows: dict, pairs: list[tuple[str, str]]) -> str:
    metrics = sorted({m for r in rows.values() for s in r.values() for m in s},
                     key=lambda m: (m != "Clean", m))
    lines = ["| Row | seeds | " + " | ".join(metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for name, per_seed in rows.items():
        cells = []
        for m in metrics:
            vals = [s[m] for s in per_seed.values() if m in s]
            mu, sd = mean_std(vals) if vals else (None, None)
            cells.append("" if mu is None else f"{mu:.1f}" + ("" if sd is None else f" ± {sd:.1f}"))
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", f"Paired differences (a - b) over the seeds both rows have; {INTERVAL_METHOD}.",
                  "",
                  "| a - b | seeds | " + " | ".join(metrics) + " |",
                  "|---|---:|" + "---:|" * len(metrics)]
        for a, b in pairs:
            if a not in rows or b not in rows:
                lines.append(f"| {a} - {b} | 0 | " + " | ".join("" for _ in metrics) + " |")
                continue
            seeds = sorted(set(rows[a]) & set(rows[b]))
            cells = []
            for m in metrics:
                if all(m in rows[a][s] and m in rows[b][s] for s in seeds) and seeds:
                    cells.append(paired_diff([rows[a][s][m] for s in seeds],
                                             [rows[b][s][m] for s in seeds]).format())
                else:
                    cells.append("")
            lines.append(f"| {a} - {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="the experiment's --out (holds run/ and teachers/)")
    ap.add_argument("dest", nargs="?", default=None, help="copy the per-seed JSON here")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="print A - B paired by seed (row names as printed; teachers as "
                         "teacher:<name>); repeatable")
    a = ap.parse_args(argv)
    exp = Path(a.experiment)
    if not (exp / "run").is_dir():
        print(f"collect_seeds: {exp} holds no run/ folder (pass the experiment's --out)",
              file=sys.stderr)
        return 2
    pairs = [tuple(p) for p in a.pair]
    rows = collect(exp, Path(a.dest) if a.dest else None)
    text = table(rows, pairs)
    if a.dest:
        (Path(a.dest) / "table.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
