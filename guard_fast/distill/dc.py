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

Run folder (cfg.out):
  config.json      the full config, written first
  metrics.jsonl    one row per outer iteration: match_loss (DC's loss_avg: the matching loss
                   per class and outer step), match_loss_first (its first outer step, on the
                   fresh network), seconds
  checkpoint.pt    synthetic images (normalized space), image optimizer, iterations done
                   (atomic; every checkpoint_every iterations and at the end)
  images/, grid.png, images.pt   the distilled set (guard_fast.distill.common.save_distilled;
                   images.pt last: its presence marks a complete set)
  run.json         status and final numbers, rewritten at the end

Determinism: iteration ``it`` reseeds torch (network init) and draws its real batches and
inner-loop order from generators seeded by (seed, it), so a run killed at any point and
resumed with ``resume=True`` ends with the same images as an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.data.loader import mix_seed
from guard_fast.runtime import append_jsonl, atomic_torch_save, atomic_write_json, load_checkpoint

__all__ = ["DCConfig", "dc", "get_loops", "match_distance", "layer_distance", "real_gradients",
           "evaluate_synset", "random_real_subset", "load_real", "RealData", "REGULARIZERS",
           "INITS"]

REGULARIZERS = ("none", "guard")
INITS = ("real", "noise")
GUARD_MODES = ("exact", "fd", "official-cifar")
H_SPACES = ("normalized", "pixel")
DC_DATASETS = ("mnist", "cifar10", "cifar100")
# DC's get_loops (public code, utils.py): ipc -> (outer_loop, inner_loop)
_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
_BN_SIZE_PC = 16  # DC: real images per class that set BatchNorm statistics (BNSizePC)
_COS_EPS = 1e-6  # DC's distance_wb denominator
# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "device", "iterations", "checkpoint_every",
                   "eval_models", "eval_epochs"}


def get_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) of DC's public code for this IPC."""
    if ipc not in _LOOPS:
        raise ValueError(f"DC defines (outer_loop, inner_loop) only for IPC in {sorted(_LOOPS)}; "
                         f"for IPC {ipc} set both outer_loop and inner_loop")
    return _LOOPS[ipc]


@dataclass
class DCConfig:
    """DC (+ GUARD) distillation. Defaults are the DC paper's / public code's; learning rates
    are per step; h is in the units of h_space."""

    data: str = "mnist"  # mnist (bundled) | cifar10 | cifar100 (data_root: the pickles)
    data_root: str | None = None
    image_size: int | None = None  # None: the dataset's (32)
    channels: int | None = None  # mnist only: 1 or 3 (None: 3, the bundle's default)
    ipc: int = 10
    iterations: int = 1000  # K: outer iterations, each with a fresh network
    outer_loop: int | None = None  # None: get_loops(ipc)
    inner_loop: int | None = None
    batch_real: int = 256
    batch_train: int = 256  # inner-loop and evaluation batch
    lr_img: float = 0.1
    momentum_img: float = 0.5
    lr_net: float = 0.01
    init: str = "real"  # real | noise (standard normal in the normalized space)
    clip_pixels: bool = False  # project S onto [0, 1] pixels after each step (not DC)
    model: str = "convnet"  # DC's ConvNet (the only choice; width/depth/norm vary it)
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"  # instancenorm | batchnorm | none
    regularizer: str = "none"  # none | guard
    h: float = 3.0
    lam: float = 100.0
    guard_mode: str = "exact"  # exact | fd | official-cifar (guard_fast.losses)
    h_space: str = "normalized"  # normalized | pixel
    eval_models: int = 0  # networks trained on the result at the end (DC: 20); 0: none
    eval_epochs: int = 1000  # DC's epoch_eval_train (300 in the first DC code, 1000 later)
    max_train: int | None = None  # a fixed random draw of N real training images
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "auto"
    out: str = "runs/dc"
    resume: bool = False
    progress: bool = True

    def loops(self) -> tuple[int, int]:
        if (self.outer_loop is None) != (self.inner_loop is None):
            raise ValueError("set both outer_loop and inner_loop, or neither (DC's get_loops)")
        if self.outer_loop is None:
            return get_loops(self.ipc)
        return int(self.outer_loop), int(self.inner_loop)

    def validate(self) -> None:
        if not isinstance(self.ipc, int) or self.ipc < 1:
            raise ValueError(f"ipc (images per class) must be an int >= 1, got {self.ipc!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; DC takes one of "
                             f"{REGULARIZERS}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.guard_mode not in GUARD_MODES:
            raise ValueError(f"guard_mode must be one of {GUARD_MODES}, got {self.guard_mode!r}")
        if self.h_space not in H_SPACES:
            raise ValueError(f"h_space must be one of {H_SPACES}, got {self.h_space!r}")
        if self.model != "convnet":
            raise ValueError(f"DC here uses DC's ConvNet (model='convnet', with width/depth/norm),"
                             f" got model={self.model!r}")
        if self.data.lower() not in DC_DATASETS:
            raise ValueError(f"DC runs on {DC_DATASETS}, got data={self.data!r}")
        ol, il = self.loops()
        if ol < 1 or il < 0:
            raise ValueError(f"need outer_loop >= 1 and inner_loop >= 0, got ({ol}, {il})")
        for k in ("iterations", "batch_real", "batch_train", "checkpoint_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
        if self.eval_models < 0 or self.eval_epochs < 0:
            raise ValueError("eval_models and eval_epochs must be >= 0")
        for k in ("lr_img", "lr_net", "h", "lam"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")


# ----------------------------------------------------------------------------- data


@dataclass
class RealData:
    """Un-augmented real images as tensors: pixels in [0, 1], (N, C, s, s) float32."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int
    mean: tuple
    std: tuple
    class_names: list
    name: str


def _stack(ds) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).float(), torch.tensor([int(y) for y in ys], dtype=torch.long)


def load_real(name: str = "mnist", root: str | None = None, image_size: int | None = None,
              channels: int | None = None) -> RealData:
    """The train/val images of a DC dataset without augmentation (DC uses the plain images).

    The last dataset read is kept in memory (decoding runs the per-image transforms); each
    call returns fresh copies of its tensors."""
    r = _load_real_cached(name.lower(), root, image_size, channels)
    return RealData(r.train_x.clone(), r.train_y.clone(), r.val_x.clone(), r.val_y.clone(),
                    r.num_classes, r.mean, r.std, list(r.class_names), r.name)


@functools.lru_cache(maxsize=1)
def _load_real_cached(name: str, root: str | None, image_size: int | None,
                      channels: int | None) -> RealData:
    from guard_fast.data import get_data
    from guard_fast.data.bundled import BundledMNIST
    from guard_fast.data.cifar import CIFAR

    key = name.lower()
    if key not in DC_DATASETS:
        raise ValueError(f"DC runs on {DC_DATASETS}, got {name!r}")
    b = get_data(key, root=root, image_size=image_size, channels=channels)  # validates options
    if key == "mnist":
        tr = BundledMNIST("train", b.image_size, b.channels, train=False)
        va = BundledMNIST("val", b.image_size, b.channels, train=False)
    else:
        tr = CIFAR(root, key, "train", b.image_size, train=False)
        va = CIFAR(root, key, "val", b.image_size, train=False)
    tx, ty = _stack(tr)
    vx, vy = _stack(va)
    return RealData(tx, ty, vx, vy, b.num_classes, tuple(b.mean), tuple(b.std),
                    list(b.class_names), key)


def _as_tensors(data) -> tuple[Tensor, Tensor]:
    if isinstance(data, RealData):
        return data.train_x, data.train_y
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return data[0], torch.as_tensor(data[1]).long()
    return _stack(data)  # a Dataset of (image, label); pass an un-augmented one


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
        raise ValueError(f"unknown regularizer {regularizer!r}; DC takes one of {REGULARIZERS}")
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _has_bn(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


# ----------------------------------------------------------------------------- evaluation


def _train_epochs(net, x, y, epochs, batch, lr, momentum, wd, gen, decay_at=None):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    n = x.shape[0]
    for ep in range(epochs):
        if decay_at is not None and ep == decay_at:
            # DC restarts the optimizer at lr * 0.1 (momentum buffers cleared)
            opt = torch.optim.SGD(net.parameters(), lr=lr * 0.1, momentum=momentum,
                                  weight_decay=wd)
        net.train()
        order = torch.randperm(n, generator=gen).to(x.device)
        for s in range(0, n, batch):
            i = order[s:s + batch]
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


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
    device = torch.device(device)
    nc = int(num_classes or (max(int(labels.max()), int(ty.max())) + 1))
    torch.manual_seed(mix_seed(seed, 0xE7A1))
    net = build_model(model, nc, images.shape[1], mean, std, image_size=images.shape[-1],
                      width=width, depth=depth, norm=norm).to(device)
    gen = torch.Generator().manual_seed(mix_seed(seed, 0xE7A2))
    _train_epochs(net, images.detach().float().to(device), labels.long().to(device), epochs,
                  batch, lr, momentum, weight_decay, gen, decay_at=epochs // 2)
    return _accuracy(net, tx.float().to(device), ty.long().to(device))


# ----------------------------------------------------------------------------- the run


def _check_run_folder(out: Path, cfg: DCConfig) -> None:
    """Refuse to mix runs: an existing folder must hold this run (then resume continues it)."""
    cfg_file = out / "config.json"
    if not cfg_file.exists():
        if cfg.resume:
            raise FileNotFoundError(f"resume: {out} holds no run (no config.json); drop resume "
                                    "to start one")
        return
    old = json.loads(cfg_file.read_text())
    if old.get("stage") != "dc":
        raise FileExistsError(f"{out} holds a run of another stage ({old.get('stage')!r}); "
                              "choose another out (nothing was overwritten)")
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a DC run; pass resume=True to continue it "
                              "or choose another out (nothing was overwritten)")
    new = dict(asdict(cfg), stage="dc")
    diff = sorted(k for k in set(old) | set(new)
                  if k not in _RESUMABLE_DIFF and old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"resume: {out} holds a DC run with different settings for {diff}; "
                         "use the same options or another out")


def _truncate_metrics(path: Path, done: int) -> None:
    """Drop rows of iterations after the checkpoint (a killed run may have logged some)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in rows if json.loads(ln).get("iteration", 0) <= done]
    from guard_fast.runtime import atomic_write_bytes

    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


def dc(cfg: DCConfig) -> dict:
    """Distill per cfg (see the module docstring); returns the final numbers (also in run.json)."""
    from guard_fast.distill.common import save_distilled
    from guard_fast.runtime import resolve_device
    from guard_fast.models import build_model

    cfg.validate()
    outer_loop, inner_loop = cfg.loops()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    _check_run_folder(out, cfg)

    real = load_real(cfg.data, cfg.data_root, cfg.image_size, cfg.channels)
    x_all, y_all = real.train_x, real.train_y
    if cfg.max_train:
        g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0xAA))
        keep = torch.randperm(len(y_all), generator=g)[:cfg.max_train]
        x_all, y_all = x_all[keep], y_all[keep]
    nc = real.num_classes
    counts = torch.bincount(y_all, minlength=nc)
    if int(counts.min()) < cfg.ipc:
        c = int(counts.argmin())
        raise ValueError(f"ipc={cfg.ipc} exceeds the {int(counts[c])} real training images of "
                         f"class {c} ({real.class_names[c]!r}); lower ipc or raise max_train")
    mean = torch.tensor(real.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(real.std, dtype=torch.float32).view(1, -1, 1, 1)
    # DC works in the normalized space (its transforms normalize); so do we
    x_all = ((x_all - mean) / std).to(device)
    y_all = y_all.to(device)
    idx_class = [torch.nonzero(y_all == c).flatten().cpu() for c in range(nc)]
    ch, s = x_all.shape[1], x_all.shape[-1]
    ipc = cfg.ipc

    def get_images(c: int, n: int, gen: torch.Generator) -> Tensor:
        ic = idx_class[c]
        return x_all[ic[torch.randperm(len(ic), generator=gen)[:n]].to(device)]

    def build_net() -> nn.Module:
        return build_model(cfg.model, nc, ch, real.mean, real.std, image_size=s,
                           width=cfg.width, depth=cfg.depth, norm=cfg.norm)

    # S: class-major, ipc images per class, in the normalized space
    g0 = torch.Generator().manual_seed(mix_seed(cfg.seed, 0x1717))
    image_syn = torch.randn(nc * ipc, ch, s, s, generator=g0).to(device)
    if cfg.init == "real":
        for c in range(nc):
            image_syn[c * ipc:(c + 1) * ipc] = get_images(c, ipc, g0)
    lo, hi = ((0 - mean) / std).to(device), ((1 - mean) / std).to(device)
    if cfg.clip_pixels:
        image_syn = torch.maximum(torch.minimum(image_syn, hi), lo)
    image_syn.requires_grad_(True)
    label_syn = torch.arange(nc, device=device).repeat_interleave(ipc)
    opt_img = torch.optim.SGD([image_syn], lr=cfg.lr_img, momentum=cfg.momentum_img)

    start = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        with torch.no_grad():
            image_syn.copy_(ck["image_syn"].to(device))
        opt_img.load_state_dict(ck["optimizer"])
        start = int(ck["iteration"])
    _truncate_metrics(out / "metrics.jsonl", start)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dict(asdict(cfg), stage="dc"))
    atomic_write_json(out / "run.json", {"status": "running", "stage": "dc"})

    def save_ckpt(done: int) -> None:
        atomic_torch_save(ckpt_path, {"image_syn": image_syn.detach().cpu(),
                                      "optimizer": opt_img.state_dict(), "iteration": done})

    from tqdm.auto import tqdm

    guard_kw = dict(regularizer=cfg.regularizer, h=cfg.h, lam=cfg.lam, guard_mode=cfg.guard_mode)
    first, last, t_total, n_done = None, None, 0.0, 0
    bar = tqdm(range(start, cfg.iterations), desc="dc", disable=not cfg.progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        torch.manual_seed(mix_seed(cfg.seed, it, 1))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, it, 2))
        wrapped = build_net().to(device)  # init on the seeded global RNG
        net = wrapped.model
        net.train()
        params = list(net.parameters())
        opt_net = torch.optim.SGD(params, lr=cfg.lr_net)
        bn = _has_bn(net)
        pixel = dict(pixel_net=wrapped, mean=real.mean, std=real.std) \
            if cfg.regularizer == "guard" and cfg.h_space == "pixel" else {}
        loss_sum, loss_first = 0.0, None
        for ol in range(outer_loop):
            if bn:  # DC: set BN statistics from a real batch, then freeze them
                net.train()
                with torch.no_grad():
                    net(torch.cat([get_images(c, _BN_SIZE_PC, gen) for c in range(nc)]))
                for m in net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            loss = image_syn.new_zeros(())
            for c in range(nc):
                xr = get_images(c, cfg.batch_real, gen)
                yr = torch.full((xr.shape[0],), c, dtype=torch.long, device=device)
                g_real = real_gradients(net, xr, yr, params, **guard_kw, **pixel)
                xs = image_syn[c * ipc:(c + 1) * ipc]
                ys = label_syn[c * ipc:(c + 1) * ipc]
                g_syn = torch.autograd.grad(F.cross_entropy(net(xs), ys), params,
                                            create_graph=True)
                loss = loss + match_distance(g_real, g_syn)
            opt_img.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            if cfg.clip_pixels:
                with torch.no_grad():
                    image_syn.copy_(torch.maximum(torch.minimum(image_syn, hi), lo))
            lv = float(loss.detach())
            loss_sum += lv
            loss_first = lv if loss_first is None else loss_first
            if ol == outer_loop - 1:
                break
            # train the network on S (a detached copy), inner_loop epochs
            net.train()
            xs_all, ys_all = image_syn.detach().clone(), label_syn
            for _ in range(inner_loop):
                order = torch.randperm(xs_all.shape[0], generator=gen).to(device)
                for b in range(0, xs_all.shape[0], cfg.batch_train):
                    i = order[b:b + cfg.batch_train]
                    l_net = F.cross_entropy(net(xs_all[i]), ys_all[i])
                    opt_net.zero_grad(set_to_none=True)
                    l_net.backward()
                    opt_net.step()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"DC matching loss is not finite at iteration {it + 1}; "
                                     "lower lr_img (or lam with GUARD)")
        dt = time.perf_counter() - t0
        row = {"iteration": it + 1, "match_loss": loss_sum / (nc * outer_loop),
               "match_loss_first": loss_first / nc, "seconds": dt}
        append_jsonl(out / "metrics.jsonl", row)
        first = row if first is None else first
        last = row
        t_total += dt
        n_done += 1
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            save_ckpt(it + 1)
        if cfg.progress:
            bar.set_postfix(loss=f"{row['match_loss']:.4f}")
    if n_done == 0 and not ckpt_path.exists():  # nothing to do and nothing saved
        save_ckpt(start)

    with torch.no_grad():
        raw = image_syn.detach().cpu() * std + mean
    clamped = float(((raw < 0) | (raw > 1)).float().mean())
    images = raw.clamp(0, 1)
    labels = label_syn.cpu()
    ipc_ids = torch.arange(ipc).repeat(nc)
    result = {"stage": "dc", "data": real.name, "ipc": ipc, "iterations": cfg.iterations,
              "outer_loop": outer_loop, "inner_loop": inner_loop,
              "regularizer": cfg.regularizer, "clamped_fraction": clamped,
              "seconds_per_iteration": t_total / n_done if n_done else None,
              "metrics_first": first, "metrics_last": last}
    if cfg.regularizer == "guard":
        result.update(h=cfg.h, lam=cfg.lam, guard_mode=cfg.guard_mode, h_space=cfg.h_space)
    if cfg.eval_models:
        accs = [evaluate_synset(images, labels, real, mean=real.mean, std=real.std,
                                num_classes=nc, epochs=cfg.eval_epochs, batch=cfg.batch_train,
                                lr=cfg.lr_net, model=cfg.model, width=cfg.width,
                                depth=cfg.depth, norm=cfg.norm, seed=mix_seed(cfg.seed, k),
                                device=device)
                for k in range(cfg.eval_models)]
        t = torch.tensor(accs, dtype=torch.float64)
        result.update(eval_accs=accs, eval_acc_mean=float(t.mean()),
                      eval_acc_std=float(t.std()) if len(accs) > 1 else 0.0)
    meta = dict(result, method="dc", mean=list(real.mean), std=list(real.std),
                image_size=s, channels=ch, num_classes=nc)
    save_distilled(out, images, labels, ipc_ids, class_names=real.class_names, meta=meta)
    result["images"] = str(out / "images.pt")
    atomic_write_json(out / "run.json", dict(result, status="complete"))
    return result
