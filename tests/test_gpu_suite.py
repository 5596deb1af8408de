"""bench/gpu_suite.sh runs end to end (CPU smoke form) and leaves result rows and a log."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_on_cpu(tmp_path):
    # The suite stops starting steps once its budget (SUITE_BUDGET_S, 540 s by default, sized
    # for the GPU lease) is spent; on a slow or loaded CPU the last steps were skipped and the
    # test failed without any step being wrong, so the CPU smoke run gets a larger budget.
    env = dict(os.environ, SUITE_DEVICE="cpu", SUITE_BUDGET_S="900")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=960)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_suite.log").read_text()
    assert "=== done" in log, log[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in rows} == {"ce", "exact"}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows), rows
    assert all(r["gflops"] > 0 and r["ops"] > 0 for r in rows), rows  # FLOP / launch counts
    summary = [json.loads(l) for l in (tmp_path / "out" / "loss_summary.jsonl").read_text().splitlines()]
    assert summary[0]["guard_x_ce"] > 1 and summary[0]["flops_guard_x_ce"] > 1, summary
    assert (tmp_path / "out" / "attacks.jsonl").exists(), log[-3000:]
    ops = [json.loads(l) for l in (tmp_path / "out" / "ops.jsonl").read_text().splitlines()]
    assert {r["op"] for r in ops} == {"perturb", "sqdiff_norm", "sqdiff_norm_backward"}
    assert {"torch", "op"} <= {r["impl"] for r in ops} and all(r["us_per_call"] > 0 for r in ops)
    sq = [json.loads(l) for l in (tmp_path / "out" / "squeeze.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in sq} == {"compute", "loader", "loader_vs_step"}
    assert all(r["images_per_s"] > 0 for r in sq if r["kind"] != "loader_vs_step")
    assert {r["regularizer"] for r in sq if r["kind"] == "loader_vs_step"} == {"none", "guard"}
    assert all(r["loader_over_step"] > 0 for r in sq if r["kind"] == "loader_vs_step")
    rc = [json.loads(l) for l in (tmp_path / "out" / "recover.jsonl").read_text().splitlines()]
    assert rc[0]["variant"].startswith("straightforward") and all(r["images_per_s"] > 0 for r in rc)
    mt = [json.loads(l) for l in (tmp_path / "out" / "mtt.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in mt} == {"mtt", "tesla"} and all(r["peak_mem_mb"] > 0 for r in mt)
    assert (tmp_path / "out" / "e2e.jsonl").exists(), log[-3000:]
    e2e = [json.loads(l) for l in (tmp_path / "out" / "e2e.jsonl").read_text().splitlines()]
    stages = {(r.get("method"), r["stage"]) for r in e2e}
    for m in ("sre2l", "guard"):
        for s in ("squeeze", "recover", "relabel", "student", "eval"):
            assert (m, s) in stages, (m, s)
    assert any(r["stage"] == "total" for r in e2e)


def test_bench_commit_label(monkeypatch):
    """Result rows carry BENCH_COMMIT when it is set (a lent machine's copy may carry a
    stale .git), else git's HEAD."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import harness
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")
    assert harness._commit() == "abc1234"
    monkeypatch.delenv("BENCH_COMMIT")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert harness._commit().split("+")[0] in (head, "unknown")
