"""Squeeze: train the teacher that recover, relabel and DC use, with a selectable regularizer.

Regularizers: guard (GuardLoss, any mode), none (plain SRe2L), gr (GradNormLoss), and the
adversarial-training baselines pgd-at, trades, fbf (guard_fast.adv_training).

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
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guard_fast.config import SqueezeConfig
from guard_fast.losses import GradNormLoss, GuardLoss, guard_loss
from guard_fast.runio import (append_jsonl, atomic_torch_save, atomic_write_json,
                              load_checkpoint)

__all__ = ["squeeze", "load_teacher", "build_criterion", "resolve_device"]

# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "epochs", "workers", "device"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested, but this machine has no CUDA GPU "
                         "(torch.cuda.is_available() is False): use --device cpu")
    return dev


def _seed_epoch(seed: int, epoch: int) -> None:
    s = (seed * 1_000_003 + epoch) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def build_criterion(cfg: SqueezeConfig):
    """The training loss for cfg.regularizer: a callable crit(model, x, y) -> GuardOutput-like
    with .loss and .ce (and .penalty where there is one)."""
    r = cfg.regularizer
    if r == "guard":
        kw = dict(h=cfg.h, mode=cfg.guard_mode, bn_mode=cfg.bn_mode, chunk_size=cfg.chunk_size)
        if cfg.guard_mode == "official-imagenet":
            kw["beta"] = cfg.beta
        else:
            kw["lam"] = cfg.lam
        crit = GuardLoss(**kw)
        return lambda m, x, y: crit(m, x, y, return_parts=True)
    if r == "gr":
        crit = GradNormLoss(lam=cfg.gr_lam, mode=cfg.gr_mode, bn_mode=cfg.bn_mode)
        return lambda m, x, y: crit(m, x, y, return_parts=True)
    if r == "none":
        def ce(m, x, y):
            loss = F.cross_entropy(m(x), y)
            return _Parts(loss, loss.detach(), None)
        return ce
    from guard_fast import adv_training as at

    if r == "pgd-at":  # Table 1's "SRe2L + Adv": PGD-AT at eps (paper: 1/255), pixel units
        crit = at.PGDATLoss(eps=cfg.adv_eps, steps=cfg.adv_steps)
    elif r == "trades":  # the public code's TRADES variant, its constants (see adv_training)
        crit = at.TRADESLoss(beta=cfg.trades_beta)
    else:  # the public code's "fast is better than free": its epsilon is args.h
        crit = at.FBFLoss(eps=cfg.h)

    def adv(m, x, y):
        o = crit(m, x, y, return_parts=True)
        return _Parts(o.loss, o.ce_adv.detach(), o.robust.detach())
    return adv


class _Parts:
    def __init__(self, loss, ce, penalty):
        self.loss, self.ce, self.penalty = loss, ce, penalty


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


def _subset(ds, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:min(n, len(ds))].sort().values
    return torch.utils.data.Subset(ds, idx.tolist())


def _lr_lambda(cfg: SqueezeConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _check_run_folder(out: Path, cfg: SqueezeConfig) -> dict | None:
    """Refuse to mix runs: an existing folder must hold this run (then --resume continues it)."""
    cfg_file = out / "config.json"
    if not cfg_file.exists():
        if cfg.resume:
            raise FileNotFoundError(f"--resume: {out} holds no run (no config.json); "
                                    "drop --resume to start one")
        return None
    import json

    old = json.loads(cfg_file.read_text())
    if not cfg.resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                              "choose another --out (nothing was overwritten)")
    diff = sorted(k for k in set(old) | set(asdict(cfg))
                  if k not in _RESUMABLE_DIFF and old.get(k) != asdict(cfg).get(k))
    if diff:
        raise ValueError(f"--resume: {out} was run with different settings for {diff}; "
                         "use the same options or another --out")
    return old


def squeeze(cfg: SqueezeConfig) -> dict:
    """Train a teacher per cfg; returns the final metrics. See the module docstring."""
    from guard_fast.data import get_data, make_loader
    from guard_fast.models import build_model

    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.out)
    _check_run_folder(out, cfg)
    if world > 1:  # every rank has checked the folder before rank 0 writes to it
        import torch.distributed as dist

        dist.barrier()

    data = get_data(cfg.data, root=cfg.data_root, image_size=cfg.image_size)
    train_ds, val_ds = data.train, data.val
    # Subsets are a fixed random draw (datasets may be stored class by class).
    if cfg.max_train:
        train_ds = _subset(train_ds, cfg.max_train, cfg.seed)
    if cfg.max_val:
        val_ds = _subset(val_ds, cfg.max_val, cfg.seed + 1)

    torch.manual_seed(cfg.seed)
    wrapped = build_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels,
                          mean=data.mean, std=data.std, image_size=cfg.image_size)
    pixel_space = cfg.regularizer in ("pgd-at", "trades", "fbf") or cfg.h_space == "pixel"
    # Penalty space: the public code feeds normalized tensors, so its h is in normalized
    # units; "normalized" trains the inner network on normalized inputs (same parameters).
    core = wrapped if pixel_space else wrapped.model
    prep = (lambda x: x) if pixel_space else _Normalize(data.mean, data.std).to(device)
    core.to(device)
    if cfg.channels_last:
        core.to(memory_format=torch.channels_last)
    train_model = core
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)
    crit = build_criterion(cfg)
    if cfg.compile:
        if cfg.regularizer in ("none", "pgd-at", "trades", "fbf") or (
                cfg.regularizer == "guard" and cfg.guard_mode in ("fd", "official-imagenet")):
            train_model = torch.compile(train_model)
        else:
            raise ValueError("--compile compiles the model, which cannot be differentiated twice: "
                             "use it with first-order regularizers (none, guard --guard-mode fd or "
                             "official-imagenet, pgd-at, trades, fbf); for exact GUARD see "
                             "guard_fast.compile_guard_step")

    opt = torch.optim.SGD(core.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    per_rank = cfg.batch_size // world
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(train_ds)} training images")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch))
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch = int(ck["epoch"]) + 1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", asdict(cfg))
        atomic_write_json(out / "run.json", {"status": "running", "stage": "squeeze"})

    val_loader = make_loader(val_ds, batch_size=256, shuffle=False, seed=cfg.seed)
    from tqdm.auto import tqdm

    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        _seed_epoch(cfg.seed, epoch)
        loader = make_loader(train_ds, batch_size=per_rank, shuffle=True, seed=cfg.seed,
                             epoch=epoch, workers=cfg.workers, drop_last=True,
                             pin_memory=device.type == "cuda", rank=rank, world_size=world)
        train_model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, ce, penalty (summed over steps)
        t0 = time.perf_counter()
        n_img = 0
        bar = tqdm(loader, desc=f"squeeze epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or rank != 0, leave=False)
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                parts = crit(train_model, prep(x), y)
            scaler.scale(parts.loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            pen = parts.penalty if parts.penalty is not None else torch.zeros(())
            sums += torch.stack([parts.loss.detach().double().cpu(), parts.ce.double().cpu(),
                                 pen.double().cpu()])
            n_img += len(y) * world
        steps = max(1, steps_per_epoch)
        vm = _val_metrics(core, prep, val_loader, device, cfg) if rank == 0 else {}
        metrics = {"epoch": epoch + 1, "train_loss": float(sums[0]) / steps,
                   "train_ce": float(sums[1]) / steps, "train_penalty": float(sums[2]) / steps,
                   "lr": sched.get_last_lr()[0], "images_per_s": n_img / (time.perf_counter() - t0),
                   **vm}
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", metrics)
            atomic_torch_save(ckpt_path, {"model": core.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(),
                                          "scaler": scaler.state_dict(), "epoch": epoch})
            if cfg.progress:
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f} "
                      f"val acc {vm['val_acc']:.4f} val penalty {vm['val_penalty']:.4g} "
                      f"({metrics['images_per_s']:.0f} img/s)", flush=True)
    if rank == 0:
        if not metrics:  # resumed a run whose epochs were all done
            metrics = _val_metrics(core, prep, val_loader, device, cfg)
        atomic_torch_save(out / "teacher.pt", {
            "model": wrapped.state_dict(), "arch": {
                "model": cfg.model, "num_classes": data.num_classes, "in_channels": data.channels,
                "image_size": cfg.image_size, "mean": list(data.mean), "std": list(data.std),
                "data": cfg.data}, "metrics": metrics})
        atomic_write_json(out / "run.json", {"status": "complete", "stage": "squeeze",
                                             "metrics": metrics, "teacher": str(out / "teacher.pt")})
    return metrics


def load_teacher(path: str | Path, arch_expected: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a teacher from teacher.pt (weights_only load). A checkpoint whose weights do
    not fit its architecture, or one that differs from arch_expected, raises naming both."""
    from guard_fast.models import build_model

    ck = load_checkpoint(path)
    if "arch" not in ck or "model" not in ck:
        raise ValueError(f"{path} is not a guard_fast teacher (no 'arch'/'model' entries)")
    arch = ck["arch"]
    if arch_expected:
        bad = {k: (arch.get(k), v) for k, v in arch_expected.items() if arch.get(k) != v}
        if bad:
            raise ValueError(f"{path} holds a different architecture: {bad} (found, expected)")
    model = build_model(arch["model"], num_classes=arch["num_classes"],
                        in_channels=arch["in_channels"], mean=arch["mean"], std=arch["std"],
                        image_size=arch["image_size"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit architecture {arch['model']}: {e}") from e
    return model, arch
