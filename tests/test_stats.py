"""The uncertainty figures of the tables agree with an independent computation (numpy /
scipy) on made-up numbers, and the significance mark follows the interval."""
import math

import numpy as np
import pytest
from scipy import stats

from guard_fast.evaluate.stats import binomial_se, mean_std, paired_diff


def test_binomial_standard_error():
    for acc, n in ((67.0, 100), (50.0, 1000), (0.0, 10), (100.0, 7), (12.5, 8)):
        p = acc / 100
        assert binomial_se(acc, n) == pytest.approx(100 * math.sqrt(p * (1 - p) / n))
    with pytest.raises(ValueError, match="n must be"):
        binomial_se(50.0, 0)


def test_mean_std_is_the_sample_std():
    v = [41.0, 67.0, 55.5, 60.25]
    m, sd = mean_std(v)
    assert m == pytest.approx(np.mean(v)) and sd == pytest.approx(np.std(v, ddof=1))
    assert mean_std([3.0]) == (3.0, None)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        ref = rng.uniform(20, 80, n)
        meth = ref + rng.normal(2.0, 3.0, n)
        d = paired_diff(meth.tolist(), ref.tolist())
        diff = meth - ref
        lo, hi = stats.t.interval(0.95, n - 1, loc=diff.mean(), scale=stats.sem(diff))
        assert d.mean == pytest.approx(diff.mean())
        assert (d.lo, d.hi) == (pytest.approx(lo), pytest.approx(hi))
        # scipy's paired test agrees about significance at 5%
        p = stats.ttest_rel(meth, ref).pvalue
        assert d.significant == (p < 0.05)


def test_significance_mark_follows_the_interval():
    clear = paired_diff([60.0, 61.0, 62.0], [50.0, 50.5, 51.0])
    assert clear.significant and clear.format().endswith("*") and clear.lo > 0
    noisy = paired_diff([60.0, 40.0, 55.0], [50.0, 50.0, 50.0])
    assert not noisy.significant and not noisy.format().endswith("*")
    assert noisy.lo < 0 < noisy.hi
    one = paired_diff([60.0], [50.0])
    assert one.lo is None and not one.significant and one.format() == "+10.0"
    with pytest.raises(ValueError, match="same seeds"):
        paired_diff([1.0, 2.0], [1.0])


def test_collect_seeds_reads_a_partial_experiment(tmp_path, capsys):
    """bench/collect_seeds.py: rows as their seeds complete, pairs over the seeds both have,
    teachers from their robust_*.json; the per-seed JSON copied; a wrong folder exits 2."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import collect_seeds

    def student(acc, pgd):
        return {"clean": {"acc": acc}, "attacks": {"PGD100": {"acc": pgd}}}

    exp = tmp_path / "exp"
    runs = {0: {"sre2l": (80, 40), "guard": (82, 50)}, 1: {"sre2l": (84, 44), "guard": (85, 56)},
            2: {"sre2l": (81, 41)}}  # seed 2's GUARD row still running
    for k, methods in runs.items():
        for m, (acc, pgd) in methods.items():
            d = exp / "run" / f"seed{k}" / m / "eval"
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(student(acc, pgd)))
        t = exp / "teachers" / f"seed{k}" / "sre2l" / "squeeze"
        t.mkdir(parents=True)
        (t / "teacher.pt").write_bytes(b"")
        (t / "metrics.jsonl").write_text("{}\n")
        (t / "robust_paper-code_eps8_n1000_1000.json").write_text(json.dumps(
            {"clean": {"acc": 95.0 + k}, "PGD100": {"acc": 70.0 + k}, "eps": 0.03}))
    dest = tmp_path / "snap"
    assert collect_seeds.main([str(exp), str(dest), "--pair", "guard", "sre2l"]) == 0
    out = capsys.readouterr().out
    assert "| guard | 2 | 83.5 ± 2.1 | 53.0 ± 4.2 |" in out, out
    assert "| sre2l | 3 | 81.7 ± 2.1 | 41.7 ± 2.1 |" in out, out
    assert "| teacher:sre2l | 3 | 96.0 ± 1.0 | 71.0 ± 1.0 |" in out, out
    diff = paired_diff([82, 85], [80, 84])  # seeds 0 and 1 only
    assert f"| guard - sre2l | 2 | {diff.format()} |" in out, out
    assert (dest / "seed1" / "guard" / "student_eval.json").exists()
    assert (dest / "seed2" / "sre2l" / "teacher_eval.json").exists()
    assert (dest / "seed0" / "sre2l" / "teacher_metrics.jsonl").exists()
    assert (dest / "table.md").read_text() == out
    assert collect_seeds.main([str(tmp_path / "nothing")]) == 2
    assert "holds no run/ folder" in capsys.readouterr().err
