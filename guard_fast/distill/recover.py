"""Recover: synthesize the distilled images from a (GUARD) teacher, as SRe2L does (and CDA's
crop curriculum on top).

For each ipc id and each chunk of `class_batch` classes, a batch of images (one per class)
starts from Gaussian noise in the teacher's normalized input space and is optimized by Adam
(lr, betas 0.5/0.9, eps 1e-8; cosine schedule, no warm-up) for `iterations` steps. Each step
augments the batch (RandomResizedCrop + horizontal flip on the whole batch, then a random
roll of the pixels: "jitter"), runs the teacher in eval mode and minimizes

    CE(teacher(aug(x)), classes) + r_bn * sum_l w_l (||mu_l(aug(x)) - running_mean_l||_2
                                                     + ||var_l(aug(x)) - running_var_l||_2)

where mu_l, var_l are the (biased) batch statistics of the input of BatchNorm layer l and
w_l = first_bn_multiplier for the first BatchNorm layer, 1 for the others. After each step
the pixels are clipped to the valid range ([0, 1] after de-normalization). The images of
the last iteration are the result (the public code's --store-best-images stores the last).
CDA replaces the crop's minimum scale by a curriculum: 1.0 at the start, decreasing (step,
linear or cosine) to min_crop at `milestone` * iterations, min_crop after.

What is faster here than in the public code (same mathematics):
* No forward hooks: BatchNorm layers are swapped for a module that computes the statistic
  loss of its input with one `var_mean` reduction (the public hook copies the activation
  with permute().contiguous() to take the variance) and then normalizes in eval mode, so
  the whole synthesis step is one traceable function (`compile=True` compiles it).
* Grouped batches: `group_size` ipc ids are synthesized in one batch of
  group_size * class_batch images. The teacher runs in eval mode, so each image's forward
  is independent of the others; the statistics, the CE mean and the augmentation draw are
  per group, and Adam is elementwise, so each group follows exactly the trajectory of its
  own separate run (up to floating-point reduction order) while the device sees one large
  batch.
* Every random draw (initial noise, crop, flip, roll) comes from a generator keyed by
  (seed, ipc id, class chunk, iteration), so results do not depend on the grouping, on the
  process that ran them or on interruptions. Work is sharded by ipc id over torchrun
  processes (rank r takes ipc ids r, r + world, ...); a killed run resumed with resume=True
  continues from its last checkpoint (every `save_every` iterations) to the same images.
* channels_last and autocast (amp) on the forward; host syncs only at log points.

Run folder (cfg.out):
  config.json          the resolved config (written first)
  metrics.jsonl        per task and log point: losses, iterations/s
  state_rank<r>.pt     the in-progress task of process r (images, Adam state, iteration)
  parts/chunk<c>_ipc<k>.pt   finished tasks
  images.pt, images/<class>/ipc_<k>.png, grid.png   the distilled set (guard_fast.data.distilled)
  run.json             status, timing and the teacher's accuracy on the recovered images
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.config import CDA_MODES, RecoverConfig, resolve_recover
from guard_fast.data.loader import mix_seed
from guard_fast.data.transforms import rrc_fallback
from guard_fast.runtime import (RunFolder, StepWatch, atomic_torch_save, check_finite_tensor,
                                distributed, load_checkpoint,
                                load_classifier, resolve_device, teacher_path)

__all__ = ["recover", "resolve_recover", "Synthesizer", "AugDraw", "draw_augment",
           "apply_augment", "rrc_params", "cda_min_crop", "cosine_lr", "find_batchnorms",
           "bn_stat_loss_ref", "teacher_path", "synthesis_steps"]

# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "device", "save_every", "compile", "amp",
                   "channels_last"}


# ----------------------------------------------------------------------------- schedules
def cosine_lr(base_lr: float, it: int, iterations: int) -> float:
    """The public code's lr_cosine_policy without warm-up, evaluated at iteration `it`."""
    return 0.5 * (1 + math.cos(math.pi * it / iterations)) * base_lr


def cda_min_crop(it: int, iterations: int, mode: str = "cosine", milestone: float = 1.0,
                 lo: float = 0.08, hi: float = 1.0) -> float:
    """CDA's minimum crop scale at iteration `it`: from `hi` at it = 0 down to `lo` at
    it = milestone * iterations (step: hi until then), `lo` afterwards."""
    if mode not in CDA_MODES:
        raise ValueError(f"cda mode must be one of {CDA_MODES}, got {mode!r}")
    end = milestone * iterations
    if it >= end:
        return lo
    if mode == "step":
        return hi
    t = it / end
    if mode == "linear":
        return lo + (hi - lo) * (1 - t)
    return lo + (hi - lo) * (1 + math.cos(math.pi * t)) / 2


# ----------------------------------------------------------------------------- augmentation
def rrc_params(rng: random.Random, height: int, width: int, scale: Sequence[float],
               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from `rng` by torchvision's
    algorithm (10 tries at a random area fraction in `scale` and log-uniform aspect ratio in
    `ratio`, then the largest centred crop within `ratio`)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return rrc_fallback(height, width, ratio)


@dataclass(frozen=True)
class AugDraw:
    """One augmentation of a whole group: crop box (top, left, h, w) or None, flip, roll."""

    crop: tuple[int, int, int, int] | None
    flip: bool
    shift: tuple[int, int]


def _rng(seed: int, ipc_id: int, chunk: int, it: int) -> random.Random:
    return random.Random(mix_seed(seed, ipc_id, chunk, it))


def draw_augment(rng: random.Random, size: int, crop: bool, flip: bool, jitter: int,
                 jitter_mode: str, min_crop: float, max_crop: float) -> AugDraw:
    """The public code's per-iteration augmentation draw (crop, then flip, then roll)."""
    box = rrc_params(rng, size, size, (min_crop, max_crop)) if crop else None
    fl = bool(flip and rng.random() < 0.5)
    if jitter_mode == "positive":
        shift = (rng.randint(0, jitter), rng.randint(0, jitter))
    else:
        shift = (rng.randint(-jitter, jitter), rng.randint(-jitter, jitter))
    return AugDraw(box, fl, shift)


def apply_augment(x: Tensor, d: AugDraw, size: int) -> Tensor:
    """Crop-and-resize (bilinear, antialiased, as torchvision's RandomResizedCrop on tensors),
    flip, roll; differentiable in x."""
    if d.crop is not None:
        top, left, h, w = d.crop
        x = F.interpolate(x[:, :, top:top + h, left:left + w], size=(size, size),
                          mode="bilinear", align_corners=False, antialias=True)
    if d.flip:
        x = x.flip(-1)
    if d.shift != (0, 0):
        x = torch.roll(x, shifts=d.shift, dims=(2, 3))
    return x


# ----------------------------------------------------------------------------- BN statistics
def find_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def bn_stat_loss_ref(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """The public code's per-layer statistic loss of a BatchNorm input x (one group)."""
    c = x.shape[1]
    mean = x.mean([0, 2, 3])
    var = x.permute(1, 0, 2, 3).contiguous().reshape(c, -1).var(1, unbiased=False)
    return torch.norm(bn.running_var - var, 2) + torch.norm(bn.running_mean - mean, 2)


class _StatBN(nn.Module):
    """An eval-mode BatchNorm2d that also appends, per group of the batch, the statistic
    loss ||var - running_var||_2 + ||mean - running_mean||_2 of its input (float32) to the
    owner's list. Keeps the BatchNorm's parameters and buffers (shared, not copied)."""

    def __init__(self, bn: nn.BatchNorm2d, sink: list, weight: float):
        super().__init__()
        self.bn = bn
        self._sink = sink
        self.weight = weight
        self.groups = 1

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        xs = x.float().unflatten(0, (self.groups, -1))
        var, mean = torch.var_mean(xs, dim=(1, 3, 4), correction=0)  # (G, C) each
        r = (torch.linalg.vector_norm(var - bn.running_var.float(), dim=1)
             + torch.linalg.vector_norm(mean - bn.running_mean.float(), dim=1))
        self._sink.append(r * self.weight)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)


class Synthesizer(nn.Module):
    """The teacher (inner network, normalized inputs) with its BatchNorm layers swapped for
    statistic-recording ones. forward(x_aug, targets) -> (loss, ce, bn) per group, each (G,):
    loss = ce + r_bn * bn, ce the group's mean cross-entropy, bn the weighted sum over layers.

    The teacher itself is not modified (its modules are shallow-copied where swapped); its
    parameters are frozen while the Synthesizer lives (requires_grad=False)."""

    def __init__(self, teacher: nn.Module, r_bn: float, first_bn_multiplier: float = 10.0,
                 groups: int = 1):
        super().__init__()
        if not find_batchnorms(teacher):
            raise ValueError(
                f"recover needs a teacher with BatchNorm layers (it matches their running "
                f"statistics), but {type(teacher).__name__} has none; train the teacher with a "
                "BatchNorm model such as resnet18 (the ConvNet's instance norm keeps no statistics)")
        self._sink: list = []
        self.net = self._swap(teacher)
        self.r_bn = float(r_bn)
        self.stat_layers = [m for m in self.net.modules() if isinstance(m, _StatBN)]
        for i, m in enumerate(self.stat_layers):
            m.weight = float(first_bn_multiplier) if i == 0 else 1.0
        self.set_groups(groups)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def _swap(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.BatchNorm2d):
            return _StatBN(module, self._sink, 1.0)
        children = dict(module.named_children())
        if not children:
            return module
        new = {n: self._swap(c) for n, c in children.items()}
        if all(new[n] is children[n] for n in children):
            return module
        import copy

        clone = copy.copy(module)  # shares parameters and buffers; own _modules dict
        clone._modules = dict(module._modules)
        for n, c in new.items():
            clone._modules[n] = c
        return clone

    def set_groups(self, groups: int) -> None:
        for m in self.stat_layers:
            m.groups = int(groups)

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._sink.clear()
        logits = self.net(x)
        g = self.stat_layers[0].groups
        ce = F.cross_entropy(logits.float(), targets, reduction="none").unflatten(0, (g, -1)).mean(1)
        bn = torch.stack(self._sink).sum(0)
        self._sink.clear()
        return ce + self.r_bn * bn, ce, bn


# ----------------------------------------------------------------------------- config
# ----------------------------------------------------------------------------- the run
def _tasks(cfg: RecoverConfig, num_classes: int, rank: int, world: int):
    """This rank's tasks: (chunk index, classes of the chunk, ipc ids of the group)."""
    mine = [k for k in range(cfg.ipc) if k % world == rank]
    groups = [mine[i:i + cfg.group_size] for i in range(0, len(mine), cfg.group_size)]
    chunks = [list(range(s, min(s + cfg.class_batch, num_classes)))
              for s in range(0, num_classes, cfg.class_batch)]
    return [(c, chunk, grp) for grp in groups for c, chunk in enumerate(chunks)]


def _part(out: Path, chunk: int, ipc_id: int) -> Path:
    return out / "parts" / f"chunk{chunk:04d}_ipc{ipc_id:05d}.pt"


def _init_noise(cfg, chunk: int, ipc_id: int, n: int, channels: int, size: int) -> Tensor:
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, ipc_id, chunk, -1))
    return torch.randn((n, channels, size, size), generator=g)


def synthesis_steps(step_fn, x: Tensor, opt: torch.optim.Optimizer, targets: Tensor,
                    cfg: RecoverConfig, *, chunk: int, group: Sequence[int], size: int,
                    lo: Tensor, hi: Tensor, start: int, stop: int, amp_dtype=None,
                    on_step=None, progress: bool = False):
    """Iterations start..stop-1 of one task: x (len(group) * n, C, S, S) normalized images
    (leaf, requires_grad), group-major; targets the matching classes. step_fn(x_aug, targets)
    -> (loss, ce, bn) per group (a Synthesizer, compiled or not). on_step(it, loss, ce, bn)
    gets detached per-group values after each step (the caller decides when to sync).
    Returns the last (loss, ce, bn)."""
    from tqdm.auto import tqdm

    g = len(group)
    n = x.shape[0] // g
    channels_last = cfg.channels_last
    dev_type = x.device.type
    last = None
    for it in tqdm(range(start, stop), leave=False, disable=not progress,
                   desc=f"recover chunk {chunk} ipc {group[0]}..{group[-1]}"):
        for pg in opt.param_groups:
            pg["lr"] = cosine_lr(cfg.lr, it, cfg.iterations)
        min_crop = (cda_min_crop(it, cfg.iterations, cfg.cda_mode, cfg.milestone,
                                 cfg.min_crop, cfg.max_crop)
                    if cfg.method == "cda" else cfg.min_crop)
        views = []
        for gi, k in enumerate(group):
            d = draw_augment(_rng(cfg.seed, k, chunk, it), size, cfg.crop, cfg.flip,
                             cfg.jitter, cfg.jitter_mode, min_crop, cfg.max_crop)
            views.append(apply_augment(x[gi * n:(gi + 1) * n], d, size))
        xj = torch.cat(views) if g > 1 else views[0]
        if channels_last:
            xj = xj.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, ce, bn = step_fn(xj, targets)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            torch.maximum(x, lo, out=x)
            torch.minimum(x, hi, out=x)
        last = (loss.detach(), ce.detach(), bn.detach())
        if on_step is not None:
            on_step(it, *last)
    return last


class _Synthesis:
    """What every task of a run shares: the teacher's inner network wrapped for the
    statistics loss, the pixel bounds in its normalized space, and the step function."""

    def __init__(self, cfg: RecoverConfig, wrapped: nn.Module, arch: dict, device: torch.device):
        inner = wrapped.model if hasattr(wrapped, "model") else wrapped
        self.mean = torch.tensor(arch["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(arch["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.lo = (-self.mean / self.std).to(device)
        self.hi = ((1 - self.mean) / self.std).to(device)
        self.size, self.channels = int(arch["image_size"]), int(arch["in_channels"])
        self.ncls = int(arch["num_classes"])
        self.syn = Synthesizer(inner, cfg.r_bn, cfg.first_bn_multiplier).to(device)
        if cfg.channels_last:
            self.syn.net.to(memory_format=torch.channels_last)
        self.step_fn = torch.compile(self.syn, dynamic=False) if cfg.compile else self.syn
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.device = device


def _run_task(cfg: RecoverConfig, s: _Synthesis, folder: RunFolder, d, chunk: int,
              classes: list, group: list) -> tuple[int, int]:
    """Synthesize one (class chunk, ipc group) task to its part files, resuming from this
    rank's state file; returns (iterations run, images x iterations run)."""
    out = folder.out
    state_file = out / f"state_rank{d.rank}.pt"
    n, g = len(classes), len(group)
    s.syn.set_groups(g)
    targets = torch.tensor(classes * g, device=s.device)
    x = torch.cat([_init_noise(cfg, chunk, k, n, s.channels, s.size) for k in group]).to(s.device)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    start = 0
    if cfg.resume and state_file.exists():
        st = load_checkpoint(state_file)
        if st.get("chunk") == chunk and list(st.get("group", [])) == list(group):
            with torch.no_grad():
                x.copy_(st["x"].to(s.device))
            opt.load_state_dict(st["opt"])
            start = int(st["it"])
    t0 = time.perf_counter()
    metrics_file = f"metrics_rank{d.rank}.jsonl" if d.world > 1 else "metrics.jsonl"
    watch = StepWatch("recover")
    where = f"class chunk {chunk}, ipc ids {list(group)}"

    def on_step(it, loss, ce, bn):
        done = it + 1
        watch.observe(it, loss=loss.sum(), ce=ce.sum(), bn=bn.sum())
        if done % cfg.save_every == 0 or done == cfg.iterations:
            watch.check(where + f", up to iteration {done} (steps are iterations)")
            check_finite_tensor("recover", "images", x, f"{where}, iteration {done}")
            el = time.perf_counter() - t0
            folder.log({"chunk": chunk, "group": list(group), "iteration": done,
                        "loss": loss.tolist(), "ce": ce.tolist(), "bn": bn.tolist(),
                        "iters_per_s": (done - start) / max(el, 1e-9), "rank": d.rank},
                       metrics_file)
            if done < cfg.iterations:
                atomic_torch_save(state_file, {"chunk": chunk, "group": list(group), "it": done,
                                               "x": x.detach().cpu(), "opt": opt.state_dict()})

    last = synthesis_steps(s.step_fn, x, opt, targets, cfg, chunk=chunk, group=group,
                           size=s.size, lo=s.lo, hi=s.hi, start=start, stop=cfg.iterations,
                           amp_dtype=s.amp_dtype, on_step=on_step,
                           progress=cfg.progress and d.is_main)
    with torch.no_grad():
        pix = (x.detach().cpu() * s.std + s.mean).clamp(0, 1)
    for gi, k in enumerate(group):
        atomic_torch_save(_part(out, chunk, k), {
            "images": pix[gi * n:(gi + 1) * n].clone(), "labels": torch.tensor(classes),
            "final_loss": None if last is None else float(last[0][gi]),
            "final_ce": None if last is None else float(last[1][gi]),
            "final_bn": None if last is None else float(last[2][gi])})
    if state_file.exists():
        state_file.unlink()
    return cfg.iterations - start, (cfg.iterations - start) * n * g


def _assemble(cfg: RecoverConfig, out: Path, ncls: int):
    """The finished parts in (ipc id, class) order: images, labels, ipc ids, part dicts."""
    imgs, labels, ipc_ids, finals = [], [], [], []
    for k in range(cfg.ipc):
        for c in range(len(range(0, ncls, cfg.class_batch))):
            p = load_checkpoint(_part(out, c, k))
            imgs.append(p["images"])
            labels.append(p["labels"])
            ipc_ids.append(torch.full((len(p["labels"]),), k, dtype=torch.long))
            finals.append(p)
    return torch.cat(imgs), torch.cat(labels), torch.cat(ipc_ids), finals


def _class_names(arch: dict):
    """Class names for the image folders (cosmetic: folders fall back to indices)."""
    try:
        from guard_fast.data import get_data

        if arch.get("data") in ("mnist", "fashion-mnist"):   # need no data folder
            return get_data(arch["data"]).class_names
    except Exception:
        return None
    return None


def _finish(cfg: RecoverConfig, folder: RunFolder, wrapped: nn.Module, arch: dict, tpath: Path,
            device: torch.device, summary: dict) -> dict:
    """Rank 0: the distilled set from the parts, the teacher's accuracy on it, run.json."""
    from guard_fast.data.distilled import save_distilled

    ncls = int(arch["num_classes"])
    images, labels_t, ipc_t, finals = _assemble(cfg, folder.out, ncls)
    # How many recovered images the teacher assigns to their target class (full view).
    wrapped.to(device).eval()
    with torch.no_grad():
        pred = torch.cat([wrapped(images[i:i + 256].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), 256)])
    ces = [p["final_ce"] for p in finals if p["final_ce"] is not None]
    summary.update({"teacher_acc_on_recovered": float((pred == labels_t).float().mean()),
                    "images": len(images), "ipc": cfg.ipc, "num_classes": ncls,
                    "mean_final_ce": sum(ces) / len(ces) if ces else None})
    save_distilled(folder.out, images, labels_t, ipc_t, _class_names(arch),
                   meta={"stage": "recover", "method": cfg.method, "teacher": str(tpath),
                         "arch": arch, "mean": list(arch["mean"]), "std": list(arch["std"]),
                         "num_classes": ncls, "ipc": cfg.ipc, "image_size": int(arch["image_size"])})
    folder.complete(**summary)
    return summary


def recover(cfg: RecoverConfig) -> dict:
    """Run recover per cfg (see the module docstring); returns the run's summary metrics."""
    tpath = teacher_path(cfg.teacher)
    wrapped, arch = load_classifier(tpath)
    cfg = resolve_recover(cfg, arch.get("data", "imagefolder"))
    with distributed(resolve_device(cfg.device)) as d:
        if d.world > cfg.ipc:
            raise ValueError(f"ipc {cfg.ipc} cannot be shared by {d.world} processes (sharding is "
                             "by ipc id): use at most ipc processes")
        folder = RunFolder(cfg.out, "recover", dict(asdict(cfg), teacher_arch=arch),
                           resume=cfg.resume, resumable=_RESUMABLE_DIFF, final="images.pt")
        folder.check()
        d.barrier()  # every rank has checked the folder before rank 0 writes to it
        if d.is_main:
            folder.start()
        s = _Synthesis(cfg, wrapped, arch, d.device)
        t_start = time.perf_counter()
        n_iter_run = n_img_run = 0
        for chunk, classes, group in _tasks(cfg, s.ncls, d.rank, d.world):
            if all(_part(folder.out, chunk, k).exists() for k in group):
                continue
            it, img = _run_task(cfg, s, folder, d, chunk, classes, group)
            n_iter_run += it
            n_img_run += img
        elapsed = time.perf_counter() - t_start
        d.barrier()
        summary = {"iterations_run": n_iter_run, "seconds": elapsed,
                   "iters_per_s": n_iter_run / max(elapsed, 1e-9),
                   "images_per_s": n_img_run / max(elapsed, 1e-9)}
        if d.is_main:
            summary = _finish(cfg, folder, wrapped, arch, tpath, d.device, summary)
    return summary
