"""guard_fast.evaluate.robust_eval and format_table on the MNIST CNN of test_attacks (CPU).

The full protocols (PGD-100, AutoAttack with 100-iteration stages, Square with 5000
queries) are too slow for a CPU test suite; most tests pass reduced-budget builders through
`attacks=`, and the protocol tests run the protocols' cheaper attacks as defined.
"""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import guard_fast.attacks as A
from guard_fast.evaluate import format_table, robust_eval
from test_attacks import EPS, guard_code_mim, trained_mnist

N = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist():
    model, x, y, _ = trained_mnist()
    return model, x[100:100 + N].clone(), y[100:100 + N].clone()


def cheap(seed_sensitive=True):
    b = {
        "PGD100": lambda m, e, **kw: A.PGD(m, eps=e, alpha=e / 4, steps=5, **kw),
        "AutoAttack": lambda m, e, **kw: A.AutoAttack(m, eps=e, apgd_steps=5, fab_steps=5,
                                                      square_queries=30, n_target_classes=2, **kw),
        "CW": lambda m, e, **kw: A.CWLinf(m, eps=e, steps=5, **kw),
        "CW-L2": lambda m, e, **kw: A.CW(m, c=1.0, steps=5, **kw),
    }
    if seed_sensitive:
        b["Square"] = lambda m, e, **kw: A.Square(m, eps=e, n_queries=30, **kw)
    return b


def test_result_structure_and_robust_below_clean(mnist):
    model, x, y = mnist
    res = robust_eval(model, (x, y), attacks=cheap(), eps=EPS, batch_size=12, progress=False)
    assert res["n_examples"] == N and res["clean"]["total"] == N
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    assert res["clean"]["correct"] == clean
    assert res["clean"]["acc"] == pytest.approx(100.0 * clean / N)
    for name, r in res["attacks"].items():
        assert 0 <= r["correct"] <= clean, name
        assert r["acc"] == pytest.approx(100.0 * r["correct"] / N)
    assert res["attacks"]["PGD100"]["correct"] < clean      # at eps=0.1 it does break points
    json.dumps(res)                                          # JSON-serializable


def test_data_forms_and_n_examples_agree(mnist):
    model, x, y = mnist
    kw = dict(attacks=cheap(), eps=EPS, batch_size=10, progress=False)
    a = robust_eval(model, (x, y), **kw)
    b = robust_eval(model, TensorDataset(x, y), **kw)
    c = robust_eval(model, DataLoader(TensorDataset(x, y), batch_size=10), **kw)
    for r in (b, c):
        assert r["clean"] == a["clean"]
        assert {k: v["correct"] for k, v in r["attacks"].items()} == \
            {k: v["correct"] for k, v in a["attacks"].items()}
    d = robust_eval(model, (torch.cat([x, x]), torch.cat([y, y])), n_examples=N, **kw)
    assert d["n_examples"] == N
    assert {k: v["correct"] for k, v in d["attacks"].items()} == \
        {k: v["correct"] for k, v in a["attacks"].items()}


def test_reproducible_and_active_set_free(mnist):
    model, x, y = mnist
    kw = dict(attacks=cheap(), eps=EPS, batch_size=16, progress=False, seed=3)
    a = robust_eval(model, (x, y), **kw)
    b = robust_eval(model, (x, y), **kw)
    c = robust_eval(model, (x, y), active_set=False, **kw)
    get = lambda r: {k: v["correct"] for k, v in r["attacks"].items()}  # noqa: E731
    assert get(a) == get(b) == get(c)


def test_eps_sweep(mnist):
    model, x, y = mnist
    res = robust_eval(model, (x, y), attacks=cheap(), eps=EPS, eps_sweep=[0.0, 0.05],
                      batch_size=16, progress=False)
    assert [s["eps"] for s in res["sweep"]] == [0.0, 0.05, EPS]
    at = {s["eps"]: s["attacks"] for s in res["sweep"]}
    clean = res["clean"]["correct"]
    for name in ("PGD100", "AutoAttack", "CW", "Square"):
        assert at[0.0][name]["correct"] == clean, name     # an empty ball changes nothing
    assert at[EPS] == res["attacks"]
    # CW L2 is not bounded by eps: run once, reported at every eps
    assert len({at[e]["CW-L2"]["correct"] for e in at}) == 1


def test_paper_code_pgd_mim_cw_match_guard_code(mnist):
    """The paper-code protocol's PGD100, MIM and CW equal what GUARD's evaluation ran:
    torchattacks 3.5.1 PGD/CW and GUARD's own mim_attack, on one batch."""
    ta = pytest.importorskip("torchattacks")
    model, x, y = mnist
    e = EPS
    res = robust_eval(model, (x, y), protocol="paper-code", attacks=["PGD100", "MIM", "CW"],
                      eps=e, batch_size=N, progress=False, seed=0)

    def acc(adv):
        with torch.no_grad():
            return int((model(adv).argmax(1) == y).sum())
    torch.manual_seed(0)
    ref_pgd = ta.PGD(model, eps=e, alpha=e / 4, steps=100)(x, y)
    ref_cw = ta.CW(model, c=1e-4)(x, y)
    ref_mim = guard_code_mim(model, x, y, e, e, 20, 1.0)
    assert res["attacks"]["PGD100"]["correct"] == acc(ref_pgd)
    assert res["attacks"]["CW"]["correct"] == acc(ref_cw)
    assert res["attacks"]["MIM"]["correct"] == acc(ref_mim)
    assert res["robust_definition"].startswith("adversarial input")


def test_standard_protocol_cheap_attacks(mnist):
    model, x, y = mnist
    res = robust_eval(model, (x, y), protocol="standard", attacks=["MIM", "CW-L2"],
                      eps=1 / 255, batch_size=N, progress=False)
    clean = res["clean"]["correct"]
    assert set(res["attacks"]) == {"MIM", "CW-L2"}
    for r in res["attacks"].values():
        assert r["correct"] <= clean
    assert res["robust_definition"].startswith("clean and adversarial")


def test_out_dir_files(mnist, tmp_path):
    model, x, y = mnist
    out = tmp_path / "eval"
    res = robust_eval(model, (x, y), attacks=cheap(), eps=EPS, eps_sweep=[0.05],
                      batch_size=16, progress=False, out_dir=str(out))
    files = sorted(os.listdir(out))
    assert files == ["eps_sweep.png", "results.json", "table.md"]      # no temp files left
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Model | Clean | PGD100 | Square | AutoAttack | CW | MIM | CW-L2 |"
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[1] == f"{res['clean']['acc']:.2f}" and cells[6] == "-"   # no MIM was run
    assert (out / "eps_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_table_flat_rows():
    rows = [{"name": "GUARD", "Clean": 57.5, "PGD100": 23.87, "Square": 44.07,
             "AutoAttack": 19.69, "CW": 41.47, "MIM": 21.8},
            {"name": "SRe2L", "Clean": 50.0, "PGD100": 4.76}]
    md = format_table(rows)
    lines = md.splitlines()
    assert lines[0] == "| Model | Clean | PGD100 | Square | AutoAttack | CW | MIM |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| GUARD | 57.50 | 23.87 | 44.07 | 19.69 | 41.47 | 21.80 |"
    assert lines[3] == "| SRe2L | 50.00 | 4.76 | - | - | - | - |"


def test_model_mode_restored(mnist):
    model, x, y = mnist
    model.train()
    try:
        robust_eval(model, (x[:8], y[:8]), attacks={"PGD100": cheap()["PGD100"]}, eps=EPS,
                    progress=False)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_bad_arguments(mnist):
    model, x, y = mnist
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        robust_eval(model, (x, y), protocol="nope", progress=False)
    with pytest.raises(ValueError, match="no attack 'PGD7'"):
        robust_eval(model, (x, y), attacks=["PGD7"], progress=False)
    with pytest.raises(ValueError, match=r"eps.*-1"):
        robust_eval(model, (x, y), eps=-1.0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        robust_eval(model, (x, y), batch_size=0, progress=False)
    with pytest.raises(TypeError, match="data must be"):
        robust_eval(model, x, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robust_eval(model, (x * 2, y), attacks={"PGD100": cheap()["PGD100"]}, progress=False)


def test_protocol_with_settings_changes_only_the_named_settings(mnist):
    """A reduced Square budget (the pipeline's square_queries) is the protocol's Square and
    AutoAttack with that one setting changed; the rest of the protocol is untouched."""
    from guard_fast.pipeline import eval_protocol

    model = mnist[0]
    pc = A.get_protocol("paper-code")
    assert eval_protocol("paper-code", None) is pc
    small = eval_protocol("paper-code", 7)
    assert small.name == pc.name and small.attack_names == pc.attack_names
    assert small.robust_requires_clean == pc.robust_requires_clean
    a, b = pc.build(model, EPS), small.build(model, EPS)
    assert (b["Square"].n_queries, a["Square"].n_queries) == (7, 5000)
    assert repr(b["Square"]) == repr(a["Square"]).replace("n_queries=5000", "n_queries=7")
    assert (b["AutoAttack"].version, b["AutoAttack"].stages[3].n_queries) == ("torchattacks", 7)
    assert a["AutoAttack"].stages[3].n_queries == 5000
    for n in ("PGD100", "CW", "MIM"):
        assert repr(b[n]) == repr(a[n]), n
    st = eval_protocol("standard", 7).build(model, EPS, ["AutoAttack"])["AutoAttack"]
    assert st.version == "standard" and st.stages[3].n_queries == 7
    with pytest.raises(ValueError, match="no attack 'Squar'"):
        pc.with_settings(Squar={"n_queries": 7})


def test_evaluate_command_draws_a_class_stratified_subset(tmp_path, monkeypatch):
    """`evaluate --model CKPT --n-examples 100` attacks 10 images of each digit (the
    validation set is stored by class: the first 100 were all zeros)."""
    import guard_fast.evaluate as ev
    from guard_fast.models import build_model
    from guard_fast.runtime import classifier_arch, save_classifier
    from guard_fast.train import main as cli

    net = build_model("convnet", 10, 3, (0.13,) * 3, (0.31,) * 3, image_size=32, width=4)
    ckpt = save_classifier(tmp_path / "m.pt", net, classifier_arch(
        "convnet", 10, 3, 32, (0.13,) * 3, (0.31,) * 3, data="mnist", options={"width": 4}))
    seen = {}

    def fake(model, data, **kw):
        seen["labels"] = data[1]
        return {"clean": {"acc": 0.0, "correct": 0, "total": len(data[1])}, "attacks": {},
                "protocol": kw["protocol"], "eps": kw["eps"], "eps_255": kw["eps"] * 255,
                "n_examples": len(data[1])}
    monkeypatch.setattr(ev, "robust_eval", fake)
    assert cli(["evaluate", "--model", str(ckpt), "--n-examples", "100",
                "--out", str(tmp_path / "e")]) == 0
    assert torch.bincount(seen["labels"], minlength=10).tolist() == [10] * 10
