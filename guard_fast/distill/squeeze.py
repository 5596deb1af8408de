"""Squeeze: train the teacher that recover, relabel and DC use, with a selectable regularizer.

Regularizers: guard (GuardLoss, any mode), none (plain SRe2L), gr (GradNormLoss), and the
adversarial-training baselines pgd-at, trades, fbf (guard_fast.losses.adversarial).

Run folder (cfg.out):
  config.json     the full resolved config, written first
  metrics.jsonl   one row per epoch (train loss parts, val accuracy, val GUARD penalty)
  checkpoint.pt   latest epoch: model, optimizer, scheduler, scaler, epoch (atomic)
  teacher.pt      the final teacher, written last: its presence marks a complete run
  run.json        status and final metrics, rewritten at the end

Determinism: each epoch reseeds torch/numpy/random from (seed, epoch) and draws its data
order from a generator seeded the same way, so a run killed at any moment and resumed with
--resume from its last checkpoint ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guard_fast.config import SqueezeConfig
from guard_fast.losses import guard_loss
from guard_fast.losses.criterion import build_criterion
from guard_fast.runtime import (DivergenceWatch, RunFolder, StepWatch, all_gather_object,
                                as_nonfinite, classifier_arch, distributed,
                                epoch_seed, load_training_state, resolve_device, save_classifier,
                                save_training_state, seed_all)

__all__ = ["squeeze", "build_criterion"]

# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "epochs", "workers", "device", "diverge_factor"}


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _val_metrics(model: nn.Module, prep, loader, device, cfg, n_penalty: int = 256) -> dict:
    """Clean accuracy on the validation set, and Eq. 11's penalty (h, lam of the config, in
    the penalty's space) on its first n_penalty images: the quantity GUARD is meant to shrink."""
    was = model.training
    model.eval()
    correct = total = 0
    pen_sum, pen_n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct += int((model(prep(x)).argmax(1) == y).sum())
        total += len(y)
        if pen_n < n_penalty:
            k = min(n_penalty - pen_n, len(y))
            with torch.no_grad():
                out = guard_loss(model, prep(x[:k]), y[:k], h=cfg.h, lam=cfg.lam, mode="exact",
                                 return_parts=True, check=False)
            pen_sum += float(out.penalty) * k
            pen_n += k
    model.train(was)
    return {"val_acc": correct / max(total, 1), "val_penalty": pen_sum / max(pen_n, 1),
            "val_images": total}


def _lr_lambda(cfg: SqueezeConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


class _Teacher:
    """The network being trained and how inputs reach it.

    wrapped: the Normalized model (takes [0, 1] pixels; what teacher.pt stores). core: the
    module the loss differentiates: the inner network on normalized inputs when h is
    measured in normalized space (the public code feeds normalized tensors, so its h is in
    those units), else the wrapped model. prep maps [0, 1] pixels to core's inputs.
    train_model: core, wrapped for DDP and torch.compile where asked."""

    def __init__(self, cfg: SqueezeConfig, data, device: torch.device, world: int):
        from guard_fast.models import build_model

        torch.manual_seed(cfg.seed)
        self.wrapped = build_model(cfg.model, num_classes=data.num_classes,
                                   in_channels=data.channels, mean=data.mean, std=data.std,
                                   image_size=cfg.image_size, **cfg.model_options)
        pixel_space = cfg.regularizer in ("pgd-at", "trades", "fbf") or cfg.h_space == "pixel"
        self.core = self.wrapped if pixel_space else self.wrapped.model
        self.prep = (lambda x: x) if pixel_space else _Normalize(data.mean, data.std).to(device)
        self.core.to(device)
        if cfg.channels_last:
            self.core.to(memory_format=torch.channels_last)
        self.train_model = self.core
        if world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.core, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            _check_compilable(cfg)
            self.train_model = torch.compile(self.train_model)


def _check_compilable(cfg: SqueezeConfig) -> None:
    first_order = cfg.regularizer in ("none", "pgd-at", "trades", "fbf") or (
        cfg.regularizer == "guard" and cfg.guard_mode in ("fd", "official-imagenet"))
    if not first_order:
        raise ValueError("--compile compiles the model, which cannot be differentiated twice: "
                         "use it with first-order regularizers (none, guard --guard-mode fd or "
                         "official-imagenet, pgd-at, trades, fbf); for exact GUARD see "
                         "guard_fast.compile_guard_step")


def _datasets(cfg: SqueezeConfig):
    """The data bundle and the train/val sets (fixed random subsets where asked)."""
    from guard_fast.data import get_data, random_subset

    data = get_data(cfg.data, root=cfg.data_root, image_size=cfg.image_size,
                    on_corrupt=cfg.on_corrupt)
    train_ds, val_ds = data.train, data.val
    if cfg.max_train:
        train_ds = random_subset(train_ds, cfg.max_train, cfg.seed)
    if cfg.max_val:
        val_ds = random_subset(val_ds, cfg.max_val, cfg.seed + 1)
    return data, train_ds, val_ds


def _note_skipped(data, folder) -> None:
    """--on-corrupt skip: the count and the first names on the console, every skipped file
    in skipped_files.json (written atomically at each start)."""
    from guard_fast.data import skipped_files, skipped_summary
    from guard_fast.runtime import atomic_write_json

    line = skipped_summary(data)
    if line is None:
        return
    print(line, flush=True)
    rows = [{"split": s, "path": p, "reason": why} for s, p, why in skipped_files(data)]
    atomic_write_json(folder.path("skipped_files.json"), {"count": len(rows), "files": rows})


class _Optim:
    """SGD with the warm-up + cosine schedule (stepped per step), and the AMP scaler."""

    def __init__(self, cfg: SqueezeConfig, core: nn.Module, n_train: int, device: torch.device):
        self.steps_per_epoch = n_train // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n_train} training images")
        self.opt = torch.optim.SGD(core.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt,
                                                       _lr_lambda(cfg, self.steps_per_epoch))
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")


def _grad_ratio(t: _Teacher, x: torch.Tensor, y: torch.Tensor) -> dict:
    """After a step's backward: the norms of the CE term's parameter gradient and of the rest
    (the regularizer's: the step's gradient minus the CE's), and their ratio. The CE gradient
    comes from one more forward/backward of the batch in the model's own mode; BatchNorm's
    running statistics are restored after it, so training is unchanged."""
    params = [p for p in t.core.parameters() if p.requires_grad]
    total = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    bufs = [b.detach().clone() for b in t.core.buffers()]
    ce = F.cross_entropy(t.core(t.prep(x)), y)
    g_ce = torch.autograd.grad(ce, params, allow_unused=True)
    with torch.no_grad():
        for b, saved in zip(t.core.buffers(), bufs):
            b.copy_(saved)
        g_ce = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_ce)]
        n_ce = torch.sqrt(sum((g.double() ** 2).sum() for g in g_ce))
        n_reg = torch.sqrt(sum(((a - g).double() ** 2).sum() for a, g in zip(total, g_ce)))
    return {"ce_grad_norm": float(n_ce), "reg_grad_norm": float(n_reg),
            "grad_ratio": float(n_reg / n_ce.clamp_min(1e-30))}


def _train_epoch(cfg, epoch, t: _Teacher, o: _Optim, crit, train_ds, device, d, log) -> dict:
    """One epoch; returns the epoch's mean loss parts and throughput. At the global steps
    cfg.grad_ratio_steps, `log` gets the regularizer-to-CE parameter-gradient ratio."""
    from tqdm.auto import tqdm

    from guard_fast.data import make_loader

    s = epoch_seed(cfg.seed, epoch)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    loader = make_loader(train_ds, batch_size=cfg.batch_size // d.world, shuffle=True,
                         seed=cfg.seed, epoch=epoch, workers=cfg.workers, drop_last=True,
                         pin_memory=device.type == "cuda", rank=d.rank, world_size=d.world)
    t.train_model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, penalty (summed over steps)
    t0 = time.perf_counter()
    n_img = 0
    bar = tqdm(loader, desc=f"squeeze epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress or not d.is_main, leave=False)
    watch = StepWatch("squeeze")
    for i, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        o.opt.zero_grad(set_to_none=True)
        lr = o.sched.get_last_lr()[0]
        try:
            with torch.autocast(device.type, dtype=o.amp_dtype, enabled=o.amp_dtype is not None):
                parts = crit(t.train_model, t.prep(x), y)
        except (ValueError, FloatingPointError) as e:  # GuardLoss's own input / penalty checks
            raise as_nonfinite("squeeze", f"epoch {epoch + 1}, step {i}", e, x, lr=lr) from e
        pen = parts.penalty if parts.penalty is not None else torch.zeros((), device=device)
        watch.observe(i, x=x, loss=parts.loss, ce=parts.ce, penalty=pen, lr=lr)
        o.scaler.scale(parts.loss).backward()
        step = epoch * o.steps_per_epoch + i + 1   # global, from 1
        if step in cfg.grad_ratio_steps and d.is_main:
            log({"step": step, **_grad_ratio(t, x, y)})
        o.scaler.step(o.opt)
        o.scaler.update()
        o.sched.step()
        sums += torch.stack([parts.loss.detach().double().cpu(), parts.ce.double().cpu(),
                             pen.double().cpu()])
        n_img += len(y) * d.world
    watch.check(f"epoch {epoch + 1}")
    steps = max(1, o.steps_per_epoch)
    return {"epoch": epoch + 1, "train_loss": float(sums[0]) / steps,
            "train_ce": float(sums[1]) / steps, "train_penalty": float(sums[2]) / steps,
            "lr": o.sched.get_last_lr()[0], "images_per_s": n_img / (time.perf_counter() - t0)}


def squeeze(cfg: SqueezeConfig) -> dict:
    """Train a teacher per cfg; returns the final metrics. See the module docstring."""
    from guard_fast.data import make_loader

    with distributed(resolve_device(cfg.device)) as d:
        device = d.device
        if cfg.batch_size % d.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {d.world} "
                             "processes")
        folder = RunFolder(cfg.out, "squeeze", asdict(cfg), resume=cfg.resume,
                           resumable=_RESUMABLE_DIFF, final="teacher.pt",
                           defaults=asdict(SqueezeConfig()))
        folder.check()
        d.barrier()  # every rank has checked the folder before rank 0 writes to it
        data, train_ds, val_ds = _datasets(cfg)
        t = _Teacher(cfg, data, device, d.world)
        crit = build_criterion(cfg)
        o = _Optim(cfg, t.core, len(train_ds), device)
        start_epoch = 0
        ckpt_path = folder.path("checkpoint.pt")
        if cfg.resume and ckpt_path.exists():
            ck = load_training_state(ckpt_path, t.core, o.opt, o.sched, o.scaler)
            start_epoch = int(ck["epoch"]) + 1
        if d.is_main:
            folder.start()
            _note_skipped(data, folder)
        val_loader = make_loader(val_ds, batch_size=256, shuffle=False, seed=cfg.seed)
        metrics: dict = {}
        # the epochs a resumed run already did, as rank 0 logged them (every rank alike)
        done = all_gather_object(folder.history("train_loss") if d.is_main else None)[0]
        diverge = DivergenceWatch("squeeze", cfg.diverge_factor, done)
        for epoch in range(start_epoch, cfg.epochs):
            metrics = _train_epoch(cfg, epoch, t, o, crit, train_ds, device, d,
                                   lambda row: folder.log(row, name="grad_ratio.jsonl"))
            losses = all_gather_object(metrics["train_loss"])   # every rank decides alike
            diverge.check(epoch + 1, sum(losses) / len(losses))
            if not d.is_main:
                continue
            metrics.update(_val_metrics(t.core, t.prep, val_loader, device, cfg))
            folder.log(metrics)
            save_training_state(ckpt_path, epoch=epoch, model=t.core, optimizer=o.opt,
                                scheduler=o.sched, scaler=o.scaler)
            if cfg.progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f} "
                      f"val acc {metrics['val_acc']:.4f} val penalty {metrics['val_penalty']:.4g} "
                      f"({metrics['images_per_s']:.0f} img/s)", flush=True)
        if d.is_main:
            if not metrics:  # resumed a run whose epochs were all done: its last epoch's row
                metrics = folder.last_log(epoch=cfg.epochs) or _val_metrics(
                    t.core, t.prep, val_loader, device, cfg)
            arch = classifier_arch(cfg.model, data.num_classes, data.channels, cfg.image_size,
                                   data.mean, data.std, data=cfg.data,
                                   options=cfg.model_options)
            save_classifier(folder.path("teacher.pt"), t.wrapped, arch, metrics)
            folder.complete(metrics=metrics, teacher=str(folder.path("teacher.pt")))
    return metrics
