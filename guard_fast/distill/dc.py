"""Dataset Condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021), with an
optional GUARD regularizer on the real-data gradient (GUARD's Table 5, "DC" in italics).

DC learns ``ipc`` synthetic images per class S so that a network's gradients on S match its
gradients on the real data T, over many randomly initialized networks:

    for it in range(iterations):                       # K = 1000 in the paper
        theta ~ fresh ConvNet init
        for ol in range(outer_loop):
            L = sum_c D(grad_theta l(T_c), grad_theta l(S_c))   # T_c: batch_real real images of c
            S <- SGD step on L (lr_img 0.1, momentum 0.5)
            if ol < outer_loop - 1:
                inner_loop epochs of SGD on theta over S (lr_net 0.01, batch_train 256)

(outer_loop, inner_loop) follow the public code's get_loops: (1, 1) for IPC 1, (10, 50) for
10, (20, 25) for 20, (30, 20) for 30, (40, 15) for 40, (50, 10) for 50; other IPCs must name
both. D is DC's layer-wise distance ("ours"): for each parameter tensor, the gradient is
reshaped to (output nodes, rest) -- conv weights (out, in*kh*kw), linear weights (out, in) as
they are, 3-d tensors (C, h*w) -- and D adds sum over rows of 1 - cos(row_real, row_syn),
with DC's 1e-6 in the cosine's denominator. One-dimensional parameters (biases, norm scales
and shifts) contribute 0, exactly as in the public code's ``distance_wb`` (the paper's text
speaks of all layers; its code, whose numbers the paper reports, skips these).

Spaces. As in DC, whose data pipeline normalizes, the synthetic images are optimized in the
normalized space ((pixel - mean) / std), so lr_img = 0.1 means what it means there; the
network is the inner ConvNet (``build_model(...).model``). The saved set is converted back to
pixels and clamped to [0, 1] (the artifact format); run.json and images.pt's meta record the
fraction of clamped values. ``clip_pixels=True`` instead projects the images onto the valid
pixel range after every image step (not in DC), so the saved set is exactly what was learned.

GUARD. With ``regularizer="guard"`` the matched real-data gradient is the parameter gradient
of GUARD's regularized loss (Eq. 11) on the real batch of class c,

    g_real = grad_theta [ mean_i CE(x_i)
                          + lam * mean_i || grad_x l(x_i + h z_i) - grad_x l(x_i) ||^2 ],
    z_i = grad_x l(x_i) / ||grad_x l(x_i)||  (detached),  l = per-sample CE,

computed by ``guard_fast.losses.guard_loss(mode=guard_mode)`` (default "exact": Eq. 11 by
double backprop; penalty passes in eval mode). Its fused path computes the penalty's
parameter gradients inside the call and hands them back through the returned loss, so
``torch.autograd.grad(loss, params)`` (no create_graph) gives exactly this gradient. The
synthetic side is unchanged (plain CE gradient, with create_graph so that D reaches S): S is
pulled towards images whose CE gradient mimics the gradient of the *curvature-regularized*
real loss, so a network trained on S follows GUARD's training direction. ``h`` is measured
in the space named by ``h_space``: "normalized" (default; the space DC and the public GUARD
code feed the network, so h = 3 means 3 normalized units) or "pixel" ([0, 1] pixels, the
penalty taken through the Normalized wrapper). ``lam`` weighs the penalty (paper: 100). The
public GUARD code has no DC variant (its repository holds only the SRe2L pipeline), so this
definition is ours; the paper does not give Table 5's DC hyper-parameters.

Configuration: guard_fast.config.DCConfig (resolved and checked by resolve_dc before any work).

Run folder (cfg.out; the rules of guard_fast.runtime.RunFolder: a folder holding another run
or another stage's run is refused, resume=True continues this run with the same settings):
  config.json      the full config and "stage": "dc", written first
  metrics.jsonl    one row per outer iteration: match_loss (DC's loss_avg: the matching loss
                   per class and outer step), match_loss_first (its first outer step, on the
                   fresh network), seconds
  checkpoint.pt    synthetic images (normalized space), image optimizer, iterations done
                   (atomic; every checkpoint_every iterations and at the end)
  images/, grid.png, images.pt   the distilled set (guard_fast.data.distilled.save_distilled;
                   images.pt last: its presence marks a complete set)
  run.json         status and final numbers, rewritten at the end

Determinism: iteration ``it`` reseeds torch (network init) and draws its real batches and
inner-loop order from generators seeded by (seed, it), so a run killed at any point and
resumed with ``resume=True`` ends with the same images as an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.config import DC_DATASETS, DC_REGULARIZERS, DCConfig, resolve_dc
from guard_fast.data.loader import mix_seed
from guard_fast.data.real import RealData, stack_dataset
from guard_fast.data.real import load_real as _load_real
from guard_fast.runtime import (NonFiniteError, RunFolder, append_jsonl, atomic_torch_save,
                                atomic_write_bytes, check_finite_tensor,
                                load_checkpoint, resolve_device)

__all__ = ["dc", "match_distance", "layer_distance", "real_gradients", "evaluate_synset",
           "random_real_subset", "load_real", "RealData"]

_BN_SIZE_PC = 16  # DC: real images per class that set BatchNorm statistics (BNSizePC)
_COS_EPS = 1e-6  # DC's distance_wb denominator
# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "device", "iterations", "checkpoint_every",
                   "eval_models", "eval_epochs"}


# ----------------------------------------------------------------------------- data


def load_real(name: str = "mnist", root: str | None = None, image_size: int | None = None,
              channels: int | None = None) -> RealData:
    """The train/val images of a DC dataset without augmentation (DC uses the plain images);
    guard_fast.data.real.load_real, restricted to DC's data sets."""
    if name.lower() not in DC_DATASETS:
        raise ValueError(f"DC runs on {DC_DATASETS}, got {name!r}")
    return _load_real(name, root, image_size, channels)


def _as_tensors(data) -> tuple[Tensor, Tensor]:
    if isinstance(data, RealData):
        return data.train_x, data.train_y
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], torch.as_tensor(data[1]).long()
    return stack_dataset(data)  # a Dataset of (image, label); pass an un-augmented one


def random_real_subset(dataset, ipc: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The baseline DC compares with: ``ipc`` random real images of each class.

    dataset: RealData (its train split), an (images, labels) pair, or a Dataset of
    (image, label) (un-augmented). Returns (images (num_classes*ipc, C, H, W), labels),
    class-major, drawn by a generator seeded with ``seed``.
    """
    x, y = _as_tensors(dataset)
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))
    idx = []
    for c in torch.unique(y).tolist():
        ic = torch.nonzero(y == c).flatten()
        if len(ic) < ipc:
            raise ValueError(f"class {c} has {len(ic)} images, fewer than ipc={ipc}")
        idx.append(ic[torch.randperm(len(ic), generator=g)[:ipc]])
    idx = torch.cat(idx)
    return x[idx].clone(), y[idx].clone()


# ----------------------------------------------------------------------------- matching


def layer_distance(gr: Tensor, gs: Tensor) -> Tensor:
    """DC's distance for one parameter's gradients (real gr, synthetic gs): rows are output
    nodes; sum over rows of 1 - cos. 1-d parameters (bias, norm) give 0, as in DC's code."""
    if gr.shape != gs.shape:
        raise ValueError(f"gradient shapes differ: {tuple(gr.shape)} vs {tuple(gs.shape)}")
    if gr.dim() == 1:
        return gs.new_zeros(())
    if gr.dim() != 2:  # conv (out, in, kh, kw) -> (out, in*kh*kw); 3-d (C, h, w) -> (C, h*w)
        gr, gs = gr.flatten(1), gs.flatten(1)
    dot = (gr * gs).sum(dim=-1)
    return (1 - dot / (gr.norm(dim=-1) * gs.norm(dim=-1) + _COS_EPS)).sum()


def match_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor]) -> Tensor:
    """DC's "ours" matching distance: the sum of layer_distance over the parameters."""
    if len(g_real) != len(g_syn):
        raise ValueError(f"{len(g_real)} real gradients but {len(g_syn)} synthetic ones")
    total = None
    for gr, gs in zip(g_real, g_syn):
        d = layer_distance(gr, gs)
        total = d if total is None else total + d
    return total


def real_gradients(net: nn.Module, x: Tensor, y: Tensor, params: Sequence[Tensor], *,
                   regularizer: str = "none", h: float = 3.0, lam: float = 100.0,
                   guard_mode: str = "exact", pixel_net: nn.Module | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                   ) -> list[Tensor]:
    """The matched real-data gradient (detached), see the module docstring.

    net takes normalized inputs x. regularizer "none": grad of mean CE (DC). "guard": grad of
    CE + GUARD's penalty; with pixel_net (the Normalized wrapper of net) and mean/std the
    penalty is taken in pixel space (h in pixels), else in the normalized space of x.
    """
    params = list(params)
    if regularizer == "none":
        loss = F.cross_entropy(net(x), y)
    elif regularizer == "guard":
        from guard_fast.losses import guard_loss

        if pixel_net is not None:
            m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            inp, model = x * s + m, pixel_net
        else:
            inp, model = x, net
        # fused: the penalty's parameter gradients are computed in the call and injected
        # into `loss`, so a first-order autograd.grad returns the full Eq. 11 gradient.
        loss = guard_loss(model, inp, y, h=h, lam=lam, mode=guard_mode, fused=True)
    else:
        raise ValueError(f"unknown regularizer {regularizer!r}; DC takes one of "
                         f"{DC_REGULARIZERS}")
    return [g.detach() for g in torch.autograd.grad(loss, params)]


# ----------------------------------------------------------------------------- evaluation


def _sgd_epoch(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, batch: int,
               gen: torch.Generator) -> None:
    """One epoch of CE training on (x, y) in batches of ``batch``, in an order drawn from gen
    (DC's inner loop and its evaluation training, without augmentation)."""
    net.train()
    order = torch.randperm(x.shape[0], generator=gen).to(x.device)
    for s in range(0, x.shape[0], batch):
        i = order[s:s + batch]
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_epochs(net, x, y, epochs, batch, lr, momentum, wd, gen, decay_at=None):
    """DC's evaluation training: SGD(lr, momentum, wd) for ``epochs`` epochs; from epoch
    decay_at on, a fresh optimizer at lr * 0.1 (DC restarts it: momentum buffers cleared)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for ep in range(epochs):
        if decay_at is not None and ep == decay_at:
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=momentum,
                                  weight_decay=wd)
        _sgd_epoch(net, opt, x, y, batch, gen)


@torch.no_grad()
def _accuracy(net, x, y, batch=512) -> float:
    net.eval()
    correct = 0
    for s in range(0, x.shape[0], batch):
        correct += int((net(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
    return correct / max(1, x.shape[0])


def evaluate_synset(images: Tensor, labels: Tensor, test, *, mean: Sequence[float],
                    std: Sequence[float], num_classes: int | None = None, epochs: int = 1000,
                    lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                    batch: int = 256, model: str = "convnet", width: int = 128,
                    depth: int = 3, norm: str = "instancenorm", seed: int = 0,
                    device: str | torch.device = "cpu") -> float:
    """DC's evaluation: train a fresh network on (images, labels) and return its test accuracy.

    images: [0, 1] pixels (N, C, H, W) (the saved distilled set); the network normalizes with
    mean/std inside. SGD (lr 0.01, momentum 0.9, weight decay 5e-4), ``epochs`` epochs of
    batches of ``batch`` (DC: 1000; the first DC code used 300), lr x0.1 from the middle on
    (DC restarts its optimizer there). No augmentation (DC uses none for ConvNet on CIFAR;
    its MNIST crop/scale/rotate augmentation is not reproduced). test: RealData (its val
    split), an (images, labels) pair in pixels, or a Dataset.
    """
    from guard_fast.models import build_model

    if isinstance(test, RealData):
        tx, ty = test.val_x, test.val_y
    else:
        tx, ty = _as_tensors(test)
    device = resolve_device(device)
    nc = int(num_classes or (max(int(labels.max()), int(ty.max())) + 1))
    torch.manual_seed(mix_seed(seed, 0xE7A1))
    net = build_model(model, nc, images.shape[1], mean, std, image_size=images.shape[-1],
                      width=width, depth=depth, norm=norm).to(device)
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xE7A2))
    train_epochs(net, images.detach().float().to(device), labels.long().to(device), epochs,
                  batch, lr, momentum, weight_decay, gen, decay_at=epochs // 2)
    return _accuracy(net, tx.float().to(device), ty.long().to(device))


# ----------------------------------------------------------------------------- the run


class _RealPool:
    """The real training images of a run, in the normalized space (DC's data pipeline
    normalizes, so its learning rates and h mean what they mean there), indexed by class."""

    def __init__(self, cfg: DCConfig, real: RealData, device: torch.device):
        x, y = real.train_x, real.train_y
        if cfg.max_train:
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0xAA))
            keep = torch.randperm(len(y), generator=g)[:cfg.max_train]
            x, y = x[keep], y[keep]
        nc = real.num_classes
        counts = torch.bincount(y, minlength=nc)
        if int(counts.min()) < cfg.ipc:
            c = int(counts.argmin())
            raise ValueError(f"ipc={cfg.ipc} exceeds the {int(counts[c])} real training images "
                             f"of class {c} ({real.class_names[c]!r}); lower ipc or raise "
                             "max_train")
        self.mean = torch.tensor(real.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(real.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.x = ((x - self.mean) / self.std).to(device)
        self.y = y.to(device)
        self.idx_class = [torch.nonzero(self.y == c).flatten().cpu() for c in range(nc)]
        self.num_classes, self.channels, self.size = nc, self.x.shape[1], self.x.shape[-1]
        self.device = device
        # the valid pixel range [0, 1], in the normalized space
        self.lo = ((0 - self.mean) / self.std).to(device)
        self.hi = ((1 - self.mean) / self.std).to(device)

    def sample(self, c: int, n: int, gen: torch.Generator) -> Tensor:
        """n random images of class c (all of them, shuffled, when it has fewer)."""
        ic = self.idx_class[c]
        return self.x[ic[torch.randperm(len(ic), generator=gen)[:n]].to(self.device)]

    def clip(self, x: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    def to_pixels(self, x: Tensor) -> Tensor:
        return x.detach().cpu() * self.std + self.mean


class _SynSet:
    """S: ipc learnable images per class, class-major, in the normalized space, with DC's image
    optimizer (SGD, lr_img, momentum_img). init "real": random real images of the class (DC's
    default); "noise": standard normal."""

    def __init__(self, cfg: DCConfig, pool: _RealPool):
        nc, ipc, ch, s = pool.num_classes, cfg.ipc, pool.channels, pool.size
        g0 = torch.Generator().manual_seed(mix_seed(cfg.seed, 0x1717))
        images = torch.randn(nc * ipc, ch, s, s, generator=g0).to(pool.device)
        if cfg.init == "real":
            for c in range(nc):
                images[c * ipc:(c + 1) * ipc] = pool.sample(c, ipc, g0)
        if cfg.clip_pixels:
            images = pool.clip(images)
        self.images = images.requires_grad_(True)
        self.labels = torch.arange(nc, device=pool.device).repeat_interleave(ipc)
        self.opt = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.ipc, self.pool, self.clip_pixels = ipc, pool, cfg.clip_pixels

    def of_class(self, c: int) -> tuple[Tensor, Tensor]:
        return (self.images[c * self.ipc:(c + 1) * self.ipc],
                self.labels[c * self.ipc:(c + 1) * self.ipc])

    def step(self, loss: Tensor) -> None:
        """One image update on the matching loss (then the projection, with clip_pixels)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.clip_pixels:
            with torch.no_grad():
                self.images.copy_(self.pool.clip(self.images))

    def save(self, path: Path, done: int) -> None:
        """checkpoint.pt: {"image_syn" (normalized space), "optimizer", "iteration"} (atomic);
        refused (NonFiniteError) when the images hold NaN/Inf: the previous one stays."""
        check_finite_tensor("dc", "image_syn", self.images, f"checkpoint {path} (iteration {done})")
        atomic_torch_save(path, {"image_syn": self.images.detach().cpu(),
                                 "optimizer": self.opt.state_dict(), "iteration": done})

    def load(self, path: Path) -> int:
        """Continue from checkpoint.pt; returns the iterations it had done."""
        ck = load_checkpoint(path)
        with torch.no_grad():
            self.images.copy_(ck["image_syn"].to(self.images.device))
        self.opt.load_state_dict(ck["optimizer"])
        return int(ck["iteration"])


def _has_bn(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _set_bn_statistics(net: nn.Module, pool: _RealPool, gen: torch.Generator) -> None:
    """DC with BatchNorm: the statistics come from one real batch (_BN_SIZE_PC images of each
    class) and are frozen (eval mode) for the matching step."""
    net.train()
    with torch.no_grad():
        net(torch.cat([pool.sample(c, _BN_SIZE_PC, gen) for c in range(pool.num_classes)]))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _match_loss(cfg: DCConfig, net: nn.Module, params: list, pool: _RealPool, syn: _SynSet,
                gen: torch.Generator, pixel: dict) -> Tensor:
    """L = sum_c D(g_real(T_c), grad_theta CE(S_c)): a real batch of batch_real images per
    class against that class's synthetic images. The synthetic gradient keeps its graph
    (create_graph) so that D reaches S; the real one is a detached target."""
    loss = syn.images.new_zeros(())
    for c in range(pool.num_classes):
        xr = pool.sample(c, cfg.batch_real, gen)
        yr = torch.full((xr.shape[0],), c, dtype=torch.long, device=pool.device)
        g_real = real_gradients(net, xr, yr, params, regularizer=cfg.regularizer, h=cfg.h,
                                lam=cfg.lam, guard_mode=cfg.guard_mode, **pixel)
        xs, ys = syn.of_class(c)
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params, create_graph=True)
        loss = loss + match_distance(g_real, g_syn)
    return loss


def _iteration(cfg: DCConfig, it: int, pool: _RealPool, syn: _SynSet, loops: tuple[int, int],
               real: RealData) -> dict:
    """One outer iteration: a fresh ConvNet (seeded by (seed, it)), then outer_loop rounds of
    [image update on the matching loss; inner_loop epochs of SGD (lr_net) on the network over
    a detached copy of S] (no network training after the last image update). Returns its
    metrics row."""
    from guard_fast.models import build_model

    outer_loop, inner_loop = loops
    t0 = time.perf_counter()
    torch.manual_seed(mix_seed(cfg.seed, it, 1))
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, it, 2))
    wrapped = build_model(cfg.model, pool.num_classes, pool.channels, real.mean, real.std,
                          image_size=pool.size, width=cfg.width, depth=cfg.depth,
                          norm=cfg.norm).to(pool.device)  # init on the seeded global RNG
    net = wrapped.model  # takes normalized inputs, like S and the pool
    net.train()
    params = list(net.parameters())
    opt_net = torch.optim.SGD(params, lr=cfg.lr_net)
    bn = _has_bn(net)
    pixel = dict(pixel_net=wrapped, mean=real.mean, std=real.std) \
        if cfg.regularizer == "guard" and cfg.h_space == "pixel" else {}
    loss_sum, loss_first = 0.0, None
    for ol in range(outer_loop):
        if bn:
            _set_bn_statistics(net, pool, gen)
        loss = _match_loss(cfg, net, params, pool, syn, gen, pixel)
        syn.step(loss)
        lv = float(loss.detach())
        loss_sum += lv
        loss_first = lv if loss_first is None else loss_first
        if ol == outer_loop - 1:
            break
        xs, ys = syn.images.detach().clone(), syn.labels
        for _ in range(inner_loop):
            _sgd_epoch(net, opt_net, xs, ys, cfg.batch_train, gen)
    if not math.isfinite(loss_sum):
        raise NonFiniteError("dc", f"iteration {it + 1}", {
            "match_loss_sum": loss_sum, "match_loss_first": loss_first, "outer_loops": outer_loop,
            "lr_img": cfg.lr_img}, "Lower lr_img (or lam with GUARD).")
    nc = pool.num_classes
    return {"iteration": it + 1, "match_loss": loss_sum / (nc * outer_loop),
            "match_loss_first": loss_first / nc, "seconds": time.perf_counter() - t0}


def _truncate_metrics(path: Path, done: int) -> None:
    """Drop rows of iterations after the checkpoint (a killed run may have logged some)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("iteration", 0) <= done]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def _iterate(cfg: DCConfig, folder: RunFolder, pool: _RealPool, syn: _SynSet, start: int,
             loops: tuple[int, int], real: RealData) -> dict:
    """Iterations start .. cfg.iterations: one metrics row each, a checkpoint every
    checkpoint_every iterations and after the last. Returns first/last rows and timing."""
    from tqdm.auto import tqdm

    ckpt = folder.path("checkpoint.pt")
    first, last, t_total, n_done = None, None, 0.0, 0
    bar = tqdm(range(start, cfg.iterations), desc="dc", disable=not cfg.progress, leave=False)
    for it in bar:
        row = _iteration(cfg, it, pool, syn, loops, real)
        append_jsonl(folder.path("metrics.jsonl"), row)
        first = row if first is None else first
        last = row
        t_total += row["seconds"]
        n_done += 1
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            syn.save(ckpt, it + 1)
        if cfg.progress:
            bar.set_postfix(loss=f"{row['match_loss']:.4f}")
    if n_done == 0 and not ckpt.exists():  # nothing to do and nothing saved
        syn.save(ckpt, start)
    return {"seconds_per_iteration": t_total / n_done if n_done else None,
            "metrics_first": first, "metrics_last": last}


def _evaluate(cfg: DCConfig, images: Tensor, labels: Tensor, real: RealData,
              device: torch.device) -> dict:
    """DC's evaluation of the result: eval_models fresh networks trained on it (seeds
    (seed, k)), their test accuracies, mean and standard deviation."""
    accs = [evaluate_synset(images, labels, real, mean=real.mean, std=real.std,
                            num_classes=real.num_classes, epochs=cfg.eval_epochs,
                            batch=cfg.batch_train, lr=cfg.lr_net, model=cfg.model,
                            width=cfg.width, depth=cfg.depth, norm=cfg.norm,
                            seed=mix_seed(cfg.seed, k), device=device)
            for k in range(cfg.eval_models)]
    t = torch.tensor(accs, dtype=torch.float64)
    return {"eval_accs": accs, "eval_acc_mean": float(t.mean()),
            "eval_acc_std": float(t.std()) if len(accs) > 1 else 0.0}


def _finish(cfg: DCConfig, folder: RunFolder, real: RealData, pool: _RealPool, syn: _SynSet,
            loops: tuple[int, int], stats: dict) -> dict:
    """Save the distilled set: back to pixels, clamped to [0, 1] (the artifact format; the
    clamped fraction is recorded), evaluated where asked; run.json "complete"."""
    from guard_fast.data.distilled import save_distilled

    with torch.no_grad():
        raw = pool.to_pixels(syn.images)
    clamped = float(((raw < 0) | (raw > 1)).float().mean())
    images, labels = raw.clamp(0, 1), syn.labels.cpu()
    ipc_ids = torch.arange(cfg.ipc).repeat(pool.num_classes)
    result = {"stage": "dc", "data": real.name, "ipc": cfg.ipc, "iterations": cfg.iterations,
              "outer_loop": loops[0], "inner_loop": loops[1], "regularizer": cfg.regularizer,
              "clamped_fraction": clamped, **stats}
    if cfg.regularizer == "guard":
        result.update(h=cfg.h, lam=cfg.lam, guard_mode=cfg.guard_mode, h_space=cfg.h_space)
    if cfg.eval_models:
        result.update(_evaluate(cfg, images, labels, real, pool.device))
    meta = dict(result, method="dc", mean=list(real.mean), std=list(real.std),
                image_size=pool.size, channels=pool.channels, num_classes=pool.num_classes)
    save_distilled(folder.out, images, labels, ipc_ids, class_names=real.class_names, meta=meta)
    result["images"] = str(folder.path("images.pt"))
    folder.complete(**result)
    return result


def dc(cfg: DCConfig) -> dict:
    """Distill per cfg (see the module docstring); returns the final numbers (also in run.json).

    The settings are checked (resolve_dc) and the run folder's rules applied before anything
    is read or written; a run is continued from its last checkpoint with cfg.resume."""
    cfg = resolve_dc(cfg)
    loops = cfg.loops()
    device = resolve_device(cfg.device)
    folder = RunFolder(cfg.out, "dc", asdict(cfg), resume=cfg.resume,
                       resumable=_RESUMABLE_DIFF, final="images.pt")
    folder.check()
    real = load_real(cfg.data, cfg.data_root, cfg.image_size, cfg.channels)
    pool = _RealPool(cfg, real, device)
    syn = _SynSet(cfg, pool)
    start = 0
    if cfg.resume and folder.path("checkpoint.pt").exists():
        start = syn.load(folder.path("checkpoint.pt"))
    _truncate_metrics(folder.path("metrics.jsonl"), start)
    folder.start()
    stats = _iterate(cfg, folder, pool, syn, start, loops, real)
    return _finish(cfg, folder, real, pool, syn, loops, stats)
