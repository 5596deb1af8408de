"""Seeded pipeline runs: every seed's chain in its own folder, the same seed reproduces the
same student bit for bit (same machine and thread count), different seeds differ; the seeded
report gives mean ± std, the paired differences against SRe2L and the teacher columns; the
real-subset control trains on real training images of the right classes."""
import json

import pytest
import torch

from guard_fast.data import get_data
from guard_fast.data.distilled import load_distilled
from guard_fast.pipeline import PipelineConfig, run_pipeline
from guard_fast.train import main

# a width-8 ConvNet (BatchNorm, for SRe2L's recover) as teacher and student: these tests
# check seeds, folders and tables, not the networks
_NET = {"model": "convnet", "model_options": {"width": 8, "norm": "batchnorm"}}
_SMALL = dict(smoke=True, progress=False, eval_examples=4, attack_examples=2, sweep=(),
              methods=("sre2l", "real"), squeeze=_NET, student=_NET)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, single_thread_module):
    out = tmp_path_factory.mktemp("seeded") / "run"
    summary = run_pipeline(PipelineConfig(out=str(out), seeds=2, **_SMALL), log=lambda *a: None)
    return out, summary


@pytest.fixture(scope="module")
def single_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_seeded_run_layout_and_report(seeded):
    out, s = seeded
    assert s["seeds"] == [0, 1] and s["reference"] == "sre2l"
    for k in (0, 1):
        assert (out / f"seed{k}" / "results.json").exists()
        assert (out / f"seed{k}" / "sre2l" / "student" / "student.pt").exists()
    assert [r["method"] for r in s["rows"]] == ["sre2l", "real_sre2l"]
    assert all(len(r["per_seed"]) == 2 for r in s["rows"])
    text = (out / "results.md").read_text()
    assert "mean ± std over 2 seeds" in text and "paired t interval" in text
    assert "Difference to SRe2L" in text and "| Real subset (SRe2L teacher) |" in text
    for col in ("Teacher clean", "Teacher PGD100", "Teacher penalty"):
        assert col in text
    # the costlier attacks saw the stratified subset, clean and PGD-100 the whole draw
    res = s["rows"][0]["per_seed"][0]["result"]
    assert res["clean"]["total"] == 4 and res["attacks"]["PGD100"]["total"] == 4
    assert res["attacks"]["MIM"]["total"] == 2 and res["costly_examples"] == 2
    assert "class-stratified subset of 2" in text
    # a rerun skips everything: the seeded summary comes back the same
    again = run_pipeline(PipelineConfig(out=str(out), seeds=2, **_SMALL), log=lambda *a: None)
    assert again["rows"] == s["rows"]


def test_same_seed_reproduces_and_seeds_differ(seeded, tmp_path):
    out, _ = seeded
    run_pipeline(PipelineConfig(out=str(tmp_path / "again"), seed=1, **_SMALL), log=lambda *a: None)
    for part in ("sre2l/squeeze/teacher.pt", "sre2l/student/student.pt", "real_sre2l/student/student.pt"):
        a, b = _weights(out / "seed1" / part), _weights(tmp_path / "again" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
        c = _weights(out / "seed0" / part)
        assert not all(torch.equal(a[k], c[k]) for k in a), part
    r0 = json.loads((out / "seed1" / "results.json").read_text())["rows"]
    r1 = json.loads((tmp_path / "again" / "results.json").read_text())["rows"]
    def accs(rows):
        return [{k: (v["correct"], v["total"]) for k, v in r["result"]["attacks"].items()}
                for r in rows]
    assert accs(r0) == accs(r1)


def test_real_subset_control_uses_real_images_of_the_right_classes(seeded):
    out, _ = seeded
    d = load_distilled(out / "seed0" / "real_sre2l" / "recover")
    data = get_data("mnist")
    data.train.transform = data.val.transform
    idx = d["meta"]["train_indices"]
    assert len(idx) == len(set(idx)) == len(d["labels"]) == 2 * 10   # smoke IPC 2
    for i, x, y in zip(idx, d["images"], d["labels"].tolist()):
        rx, ry = data.train[i]
        assert ry == y and torch.equal(rx, x)
    assert sorted(d["labels"].tolist()) == sorted(list(range(10)) * 2)
    # another seed draws other images
    other = load_distilled(out / "seed1" / "real_sre2l" / "recover")["meta"]["train_indices"]
    assert other != idx


def test_bad_seeds_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["all", "--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="real@<method>"):
        run_pipeline(PipelineConfig(out=str(tmp_path / "y"), methods=("real@",)))
    assert not (tmp_path / "y").exists()
