"""Trajectory matching: MTT (Cazenavette et al., CVPR 2022) and TESLA (Cui et al., ICML 2023).

Both learn synthetic images S (ipc per class, in the buffer's input space) and a student
step size a, per iteration:

    expert trajectory w* ~ the buffer; start t ~ U{0, ..., max_start_epoch - 1}
    w_0 = w*_t;  w_{i+1} = w_i - a g_i,  g_i = grad_w l(f(w_i, A_i(S[B_i])), y[B_i])
    L = ||w_N - w*_{t+M}||^2 / ||w*_t - w*_{t+M}||^2          (N = syn_steps, M = expert_epochs)
    S <- SGD(lr_img, momentum 0.5) on dL/dS;  a <- SGD(lr_lr, momentum 0.5) on dL/da

B_i are minibatches of batch_syn images (chunks of a random permutation, a fresh one when
used up, as the public code draws them) and A_i the DSA augmentation of step i
(guard_fast.data.dsa, drawn once per step so it can be replayed). f is the buffer's ConvNet
called with a flat parameter vector (guard_fast.models.flat.FlatNet). Labels y: the class
(MTT), or with labels="expert" TESLA's soft labels softmax(f(w*_{t+M}, S)) (detached).

Gradients.
  mtt      autograd through the whole unroll (each g_i with create_graph): exact, memory
           growing linearly with N (every step's activations and double-backward graph).
  tesla    TESLA's constant-memory gradient. With lam = dL/dw_N = 2 (w_N - w*) / D, TESLA
           takes dL/dS[B_i] = -a (d g_i / d S[B_i])^T lam and dL/da = -(sum_i g_i) . lam,
           holding w_i fixed in each term. Here: one pass without graph gives w_N (so lam),
           a second pass replays the same batches and augmentations from w_0 and takes each
           step's vector-Jacobian product at once, so only one step's graph is ever alive.
  exact    the same two passes, but the second runs backwards over the stored w_i with the
           adjoint lam_i = lam_{i+1} - a H_i lam_{i+1} (H_i: Hessian of step i's loss at w_i,
           from the same double backward that gives the image term): the exact full-unroll
           gradient, memory N parameter vectors plus one step's graph.

How TESLA's gradient relates to the exact one (tests/test_mtt.py checks all of it in float64
on a tiny ConvNet): the exact image gradient of step i's batch is -a (dg_i/dS)^T lam_{i+1},
TESLA's uses lam_N in place of lam_{i+1} for every i; that is, it drops the dependence of
the later parameters w_{i+1..N} on S[B_i] (the terms through the Hessians H_{i+1..N-1}).
Likewise dL/da drops sum_i g_i . (lam_{i+1} - lam_N). The two are equal for syn_steps = 1
(and the last step's contribution is always exact); for N > 1 they differ by those terms,
which grow with a, N and the curvature. TESLA's memory claim is therefore for an
approximation of MTT's gradient; "exact" gives MTT's gradient (equal to mtt's, tested) with
memory independent of the activations of N steps, at the cost of one more stored vector per
step.

The step size a is projected onto a >= 1e-8 after each update (MTT leaves it free; a
negative a, which a large lr_lr can reach, would train the evaluation network uphill).

Run folder (cfg.out; RunFolder rules): config.json; metrics.jsonl (a row per iteration:
loss, lr, expert, start_epoch, seconds; flushed after each checkpoint, so a resumed run never
repeats a row); checkpoint.pt (images, lr, both optimizers, iterations done; atomic);
synthetic.pt (the learned state: images in the input space, labels, soft labels, lr);
images/, grid.png, images.pt (the pixel set, clamped to [0, 1], for guard_fast's stages;
images.pt last); run.json.

Determinism: iteration it draws its expert, start epoch, batches and augmentations from a
generator seeded by (seed, it), so a resumed run ends with the images of an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor

from guard_fast.config.mtt import MTTConfig, resolve_mtt
from guard_fast.data import dsa
from guard_fast.data.loader import mix_seed
from guard_fast.data.trajectories import Buffer, build_net, load_buffer, space_of
from guard_fast.models.flat import FlatNet
from guard_fast.runtime import (NonFiniteError, RunFolder, append_jsonl, atomic_torch_save,
                                check_finite_tensor, load_checkpoint, resolve_device)

__all__ = ["mtt", "match_loss", "make_plan", "unroll_loss", "tesla_grads", "expert_labels",
           "evaluate_synthetic", "check_buffer"]

# the learned step size is projected onto [_LR_MIN, inf) after every update: MTT's code leaves
# it unconstrained, and a negative one then makes its evaluation's SGD refuse to start
_LR_MIN = 1e-8
_RESUMABLE_DIFF = {"resume", "progress", "device", "iterations", "checkpoint_every",
                   "eval_models", "eval_epochs"}


# ----------------------------------------------------------------------------- the math

def match_loss(w_n: Tensor, w_start: Tensor, w_target: Tensor) -> Tensor:
    """MTT's normalized matching loss ||w_N - w*||^2 / ||w_start - w*||^2."""
    return (F.mse_loss(w_n, w_target, reduction="sum")
            / F.mse_loss(w_start, w_target, reduction="sum"))


def make_plan(n: int, batch: int, steps: int, strategy: str | None, side: int,
              gen: torch.Generator) -> list:
    """Each step's (indices, DSA draw): chunks of a random permutation of the n images,
    taken from the end, a fresh permutation when used up (the public code's order)."""
    plan, chunks = [], []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.split(torch.randperm(n, generator=gen), batch))
        idx = chunks.pop()
        plan.append((idx, dsa.draw(strategy, len(idx), side, gen) if strategy else None))
    return plan


def _ce(flat: FlatNet, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of f(w, x) against class indices or soft targets y."""
    return F.cross_entropy(flat(w, x), y)


def _batch(images: Tensor, labels: Tensor, step) -> tuple[Tensor, Tensor]:
    idx, d = step
    idx = idx.to(images.device)
    return dsa.apply(images[idx], d), labels[idx]


def unroll_loss(flat: FlatNet, w0: Tensor, wT: Tensor, images: Tensor, labels: Tensor,
                lr: Tensor, plan: list) -> Tensor:
    """MTT: the matching loss after len(plan) differentiable SGD steps from w0 (the graph
    runs through every step back to images and lr)."""
    w = w0.detach().clone().requires_grad_(True)
    for step in plan:
        x, y = _batch(images, labels, step)
        (g,) = torch.autograd.grad(_ce(flat, w, x, y), w, create_graph=True)
        w = w - lr * g
    return match_loss(w, w0, wT)


def _forward(flat, w0, images, labels, lr, plan, keep: bool) -> tuple[Tensor, Tensor, list]:
    """The unroll without graph: (w_N, sum of g_i, [w_0..w_{N-1}] if keep)."""
    w, gsum, ws = w0.detach(), torch.zeros_like(w0), []
    a = float(lr.detach())
    for step in plan:
        if keep:
            ws.append(w)
        x, y = _batch(images.detach(), labels, step)
        wr = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_ce(flat, wr, x, y), wr)
        gsum += g
        w = (w - a * g).detach()
    return w, gsum, ws


def _step_vjp(flat, w, images, labels, step, v: Tensor, need_w: bool):
    """(g_i, d(g_i . v)/dS[B_i], d(g_i . v)/dw_i or None) at parameters w."""
    idx = step[0].to(images.device)
    xs = images.detach()[idx].requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    x = dsa.apply(xs, step[1])
    (g,) = torch.autograd.grad(_ce(flat, wr, x, labels[idx]), wr, create_graph=True)
    outs = torch.autograd.grad((g * v).sum(), (xs, wr) if need_w else (xs,))
    return g.detach(), outs[0], (outs[1] if need_w else None), idx


def tesla_grads(flat: FlatNet, w0: Tensor, wT: Tensor, images: Tensor, labels: Tensor,
                lr: Tensor, plan: list, exact: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dL/dimages, dL/dlr) by per-step recomputation (see the module docstring):
    exact=False is TESLA's gradient, exact=True the full-unroll one."""
    a = float(lr.detach())
    w_n, gsum, ws = _forward(flat, w0, images, labels, lr, plan, keep=exact)
    denom = ((w0 - wT) ** 2).sum()
    loss = ((w_n - wT) ** 2).sum() / denom
    lam = 2 * (w_n - wT) / denom
    g_img = torch.zeros_like(images)
    if not exact:
        g_lr = -(gsum * lam).sum()
        w = w0.detach()
        for step in plan:
            g, gx, _, idx = _step_vjp(flat, w, images, labels, step, lam, need_w=False)
            g_img.index_add_(0, idx, -a * gx)
            w = w - a * g
        return loss.detach(), g_img, g_lr.detach().reshape(lr.shape)
    g_lr = torch.zeros((), dtype=w0.dtype, device=w0.device)
    for i in range(len(plan) - 1, -1, -1):
        g, gx, gw, idx = _step_vjp(flat, ws[i], images, labels, plan[i], lam, need_w=True)
        g_img.index_add_(0, idx, -a * gx)
        g_lr = g_lr - (g * lam).sum()
        lam = lam - a * gw
    return loss.detach(), g_img, g_lr.reshape(lr.shape)


@torch.no_grad()
def expert_labels(flat: FlatNet, w_target: Tensor, images: Tensor) -> Tensor:
    """TESLA's soft labels: softmax of the target expert's logits on the (un-augmented)
    synthetic images."""
    was = flat.net.training
    flat.net.eval()
    p = F.softmax(flat(w_target, images.detach()), dim=1)
    flat.net.train(was)
    return p


# ----------------------------------------------------------------------------- evaluation

def evaluate_synthetic(images: Tensor, labels: Tensor, lr: float, arch: dict, *, epochs: int,
                       batch: int = 256, strategy: str | None = dsa.DSA_STRATEGY,
                       seed: int = 0, device="cpu"):
    """MTT's evaluation training: a fresh ConvNet of the buffer's arch trained on the
    synthetic set (images in the input space; labels classes or soft targets) with SGD at the
    learned step size lr, momentum 0.9, weight decay 5e-4, batches of ``batch`` augmented by
    DSA, for epochs + 1 passes, lr x 0.1 (a fresh optimizer) after pass epochs // 2 + 1, as the
    public evaluate_synset runs it. Returns the trained network (input-space inputs)."""
    device = resolve_device(device)
    torch.manual_seed(mix_seed(seed, 0xE7A1))
    net = build_net(arch).to(device)
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xE7A2))
    x, y = images.detach().float().to(device), labels.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs + 1):
        dsa.train_epoch(net, opt, x, y, batch, gen, strategy)
        if ep == epochs // 2 + 1:
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=0.9, weight_decay=5e-4)
    return net.eval()


@torch.no_grad()
def _accuracy(net, x: Tensor, y: Tensor, batch: int = 512) -> float:
    net.eval()
    hits = sum(int((net(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
               for s in range(0, x.shape[0], batch))
    return hits / max(1, x.shape[0])


# ----------------------------------------------------------------------------- the run

def check_buffer(cfg: MTTConfig, buf: Buffer) -> None:
    """Refuse a buffer that does not fit cfg, saying what to run instead."""
    meta, fix = buf.meta, (f"train a matching buffer with `python -m guard_fast.train experts "
                           f"--dataset {cfg.data} --width {cfg.width}"
                           f"{' --zca' if cfg.zca else ''} --out DIR` or pass its --buffer")
    if meta.get("stage") != "experts":
        raise ValueError(f"{buf.path} is not an experts buffer; {fix}")
    if meta["data"] != cfg.data:
        raise ValueError(f"the buffer {buf.path} holds experts of {meta['data']!r}, not of "
                         f"--dataset {cfg.data!r}; {fix}")
    if meta["arch"]["width"] != cfg.width:
        raise ValueError(f"the buffer {buf.path} holds width-{meta['arch']['width']} "
                         f"{meta['arch']['model']} experts, not --width {cfg.width}; {fix}")
    if bool(meta["zca"]) != cfg.zca:
        raise ValueError(f"the buffer {buf.path} was trained {'with' if meta['zca'] else 'without'}"
                         f" ZCA but --zca is {cfg.zca}; {fix}")
    last = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if last > buf.length:
        raise ValueError(f"--max-start-epoch {cfg.max_start_epoch} with --expert-epochs "
                         f"{cfg.expert_epochs} needs trajectories of {last} epochs, but the "
                         f"buffer {buf.path} has {buf.length}: lower them, or train experts "
                         f"with --epochs {last} or more")


class _State:
    """The learned state: images (input space), the step size, and their optimizers."""

    def __init__(self, cfg: MTTConfig, buf: Buffer, space, device):
        from guard_fast.data.real import load_real

        arch = buf.meta["arch"]
        self.real = load_real(cfg.data, cfg.data_root, arch["image_size"], arch["channels"])
        nc, ipc = arch["num_classes"], cfg.ipc
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0x1717))
        images = torch.randn(nc * ipc, arch["channels"], arch["image_size"], arch["image_size"],
                             generator=g)
        if cfg.init == "real":
            y = self.real.train_y
            for c in range(nc):
                ic = torch.nonzero(y == c).flatten()
                if len(ic) < ipc:
                    raise ValueError(f"--ipc {ipc} exceeds the {len(ic)} real images of class {c}")
                with torch.no_grad():
                    images[c * ipc:(c + 1) * ipc] = space(self.real.train_x[
                        ic[torch.randperm(len(ic), generator=g)[:ipc]]])
        self.images = images.to(device).requires_grad_(True)
        self.labels = torch.arange(nc, device=device).repeat_interleave(ipc)
        self.lr = torch.tensor(cfg.lr_teacher, device=device).requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        self.soft = None

    def save(self, path, done: int) -> None:
        atomic_torch_save(path, {"images": self.images.detach().cpu(), "lr": self.lr.detach().cpu(),
                                 "opt_img": self.opt_img.state_dict(),
                                 "opt_lr": self.opt_lr.state_dict(), "iteration": done})

    def load(self, path) -> int:
        ck = load_checkpoint(path)
        with torch.no_grad():
            self.images.copy_(ck["images"])
            self.lr.copy_(ck["lr"])
        self.opt_img.load_state_dict(ck["opt_img"])
        self.opt_lr.load_state_dict(ck["opt_lr"])
        return int(ck["iteration"])


def _iteration(cfg: MTTConfig, it: int, st: _State, buf: Buffer, flat: FlatNet, device) -> dict:
    """One distillation iteration (module docstring); returns its metrics row."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, it))
    e = int(torch.randint(len(buf.trajectories), (1,), generator=gen))
    start = int(torch.randint(cfg.max_start_epoch, (1,), generator=gen))
    traj = buf.trajectories[e]
    w0, wT = traj[start].to(device), traj[start + cfg.expert_epochs].to(device)
    labels = st.labels
    if cfg.label_mode() == "expert":
        labels = st.soft = expert_labels(flat, wT, st.images)
    n = st.images.shape[0]
    plan = make_plan(n, cfg.batch_syn or n, cfg.syn_steps, cfg.dsa_strategy if cfg.dsa else None,
                     st.images.shape[-1], gen)
    st.opt_img.zero_grad(set_to_none=True)
    st.opt_lr.zero_grad(set_to_none=True)
    if cfg.method == "mtt":
        loss = unroll_loss(flat, w0, wT, st.images, labels, st.lr, plan)
        loss.backward()
    else:
        loss, g_img, g_lr = tesla_grads(flat, w0, wT, st.images, labels, st.lr, plan,
                                        exact=cfg.tesla_gradient == "exact")
        st.images.grad, st.lr.grad = g_img, g_lr
    st.opt_img.step()
    st.opt_lr.step()
    with torch.no_grad():  # keep the step size positive (module docstring)
        st.lr.clamp_(min=_LR_MIN)
    lv = float(loss.detach())
    hint = "Lower --lr-img or --lr-lr."
    if not math.isfinite(lv):
        raise NonFiniteError(cfg.method, f"iteration {it + 1}",
                             {"matching_loss": lv, "lr": float(st.lr.detach()), "expert": e,
                              "start_epoch": start}, hint)
    # the images and step size after the update: the checkpoint is not written with NaNs
    check_finite_tensor(cfg.method, "images", st.images, f"iteration {it + 1}", hint)
    check_finite_tensor(cfg.method, "lr", st.lr, f"iteration {it + 1}", hint)
    return {"iteration": it + 1, "loss": lv, "lr": float(st.lr.detach()), "expert": e,
            "start_epoch": start, "seconds": time.perf_counter() - t0}


def _loop(cfg: MTTConfig, folder: RunFolder, st: _State, buf: Buffer, flat: FlatNet, start: int,
          device) -> dict:
    from tqdm.auto import tqdm

    rows, last, secs = [], None, []
    bar = tqdm(range(start, cfg.iterations), desc=cfg.method, disable=not cfg.progress,
               leave=False)
    for it in bar:
        last = _iteration(cfg, it, st, buf, flat, device)
        rows.append(last)
        secs.append(last["seconds"])
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            st.save(folder.path("checkpoint.pt"), it + 1)
            for r in rows:
                append_jsonl(folder.path("metrics.jsonl"), r)
            rows = []
        if cfg.progress:
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.4g}")
    return {"metrics_last": last,
            "seconds_per_iteration": sum(secs) / len(secs) if secs else None}


def _finish(cfg: MTTConfig, folder: RunFolder, st: _State, buf: Buffer, flat: FlatNet, space,
            stats: dict, device) -> dict:
    """synthetic.pt, the pixel set (clamped, the fraction recorded), optional evaluation."""
    from guard_fast.data.distilled import save_distilled

    arch = buf.meta["arch"]
    soft = st.soft  # the last iteration's soft labels, which TESLA evaluates with
    if cfg.label_mode() == "expert" and soft is None:  # resumed with no iteration left to run
        soft = expert_labels(flat, buf.trajectories[-1][-1].to(device), st.images)
    lr = float(st.lr.detach())
    atomic_torch_save(folder.path("synthetic.pt"), {
        "images": st.images.detach().cpu(), "labels": st.labels.cpu(),
        "soft_labels": None if soft is None else soft.cpu(), "lr": lr, "arch": arch,
        "zca": buf.zca, "mean": buf.meta["mean"], "std": buf.meta["std"]})
    with torch.no_grad():
        raw = space.to(device).invert(st.images.detach()).cpu()
    result = {"stage": cfg.method, "method": cfg.method, "data": cfg.data, "ipc": cfg.ipc,
              "iterations": cfg.iterations, "lr": lr, "labels": cfg.label_mode(),
              "clamped_fraction": float(((raw < 0) | (raw > 1)).float().mean()),
              "buffer": str(buf.path), "expert_regularizer": buf.meta.get("regularizer"), **stats}
    if cfg.method == "tesla":
        result["tesla_gradient"] = cfg.tesla_gradient
    if cfg.eval_models:
        accs = []
        vx = space.to(device)(st.real.val_x.to(device))
        for k in range(cfg.eval_models):
            net = evaluate_synthetic(st.images, soft if soft is not None else st.labels, lr, arch,
                                     epochs=cfg.eval_epochs, batch=cfg.batch_train,
                                     strategy=cfg.dsa_strategy if cfg.dsa else None,
                                     seed=mix_seed(cfg.seed, k), device=device)
            accs.append(_accuracy(net, vx, st.real.val_y.to(device)))
        result.update(eval_accs=accs, eval_acc_mean=sum(accs) / len(accs))
    nc = arch["num_classes"]
    meta = dict(result, mean=buf.meta["mean"], std=buf.meta["std"], image_size=arch["image_size"],
                channels=arch["channels"], num_classes=nc)
    save_distilled(folder.out, raw.clamp(0, 1), st.labels.cpu(),
                   torch.arange(cfg.ipc).repeat(nc), class_names=st.real.class_names, meta=meta)
    result["images"] = str(folder.path("images.pt"))
    folder.complete(**result)
    return result


def mtt(cfg: MTTConfig | dict | None = None) -> dict:
    """Distill per cfg with MTT or TESLA (module docstring); returns the final numbers. The
    settings, the run folder and the buffer are checked before anything is written."""
    cfg = cfg if isinstance(cfg, MTTConfig) else resolve_mtt(cfg)
    device = resolve_device(cfg.device)
    folder = RunFolder(cfg.out, cfg.method, asdict(cfg), resume=cfg.resume,
                       resumable=_RESUMABLE_DIFF, final="images.pt")
    folder.check()
    buf = load_buffer(cfg.buffer)
    check_buffer(cfg, buf)
    space = space_of(buf.meta, buf.zca)
    st = _State(cfg, buf, space, device)
    torch.manual_seed(mix_seed(cfg.seed, 0xF1))
    flat = FlatNet(build_net(buf.meta["arch"]).to(device))
    start = 0
    if cfg.resume and folder.path("checkpoint.pt").exists():
        start = st.load(folder.path("checkpoint.pt"))
    folder.start()
    stats = _loop(cfg, folder, st, buf, flat, start, device)
    return _finish(cfg, folder, st, buf, flat, space, stats, device)
