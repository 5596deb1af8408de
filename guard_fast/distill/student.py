"""Student training on a distilled set with FKD soft labels (SRe2L's validate/train_FKD.py).

A fresh registered model is trained on the relabel stage's views (replayed from a relabel
folder, or made on the fly with the teacher run online) by

    loss = KL( softmax(teacher / T) || softmax(student / T) ), reduction "batchmean"

i.e. ``nn.KLDivLoss(reduction='batchmean')(log_softmax(s / T), softmax(t / T))`` as the public
train_FKD.py computes it: without the T^2 factor (its ``loss * T * T`` line is commented out;
``loss_scale="T2"`` restores Hinton's scaling, which the Tiny-ImageNet recipe of the SRe2L
authors, zeyuanyin/tiny-imagenet train_kd.py, uses). T = 20 in train_FKD.sh (the script's own
default is 3; the CIFAR relabel script hard-codes 30).

Optimizer (public train_FKD.py defaults): AdamW lr 0.001, weight decay 0.01 (torch's default
betas 0.9, 0.999), decay only on weight tensors with more than one dimension (its
get_parameters: BatchNorm weights and biases get none); the --cos schedule,
lr_e = lr * 0.5 * (1 + cos(pi * e / epochs)), is stepped once per epoch (no warmup). With
gradient accumulation each micro-batch loss is divided so that the gradient equals the
whole batch's batchmean (the public code divides by the accumulation count, the same thing
for full batches).

Presets (STUDENT_PRESETS): the public code's runs, named by dataset, plus a CPU "mnist" one.

Run folder (cfg.out):
  config.json     the resolved config, written first (a different existing run -> error)
  metrics.jsonl   one row per epoch: train KD loss, agreement with the teacher, lr, val acc
  checkpoint.pt   latest epoch: model, optimizer, scheduler, epoch (atomic)
  student.pt      the final student, written last, in squeeze's teacher.pt format
                  ({"model": Normalized state_dict, "arch": {...}, "metrics": {...}}), so
                  guard_fast.runtime.load_classifier(student.pt) rebuilds it
  run.json        status and final metrics

Determinism: the model is initialised from cfg.seed and every batch is a function of the
views of (seed, epoch), so a run stopped after any epoch and resumed (resume=True) ends with
the same weights as an uninterrupted one. Multi-process (torchrun, env RANK/WORLD_SIZE):
every rank reads the same global batch of views and builds and trains on its contiguous
share of its rows (losses scaled so that DDP's gradient mean equals the single-process
batchmean gradient). BatchNorm statistics are per process, as with the public code's
DataParallel chunks; the result equals one process exactly only for models without batch
statistics (e.g. the instance-norm ConvNet).

CLI: ``python -m guard_fast.distill.student --config cfg.json [--stop-after K]`` (a JSON
object of StudentConfig fields; works under torchrun).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.runtime import append_jsonl, atomic_torch_save, atomic_write_json, load_checkpoint

__all__ = ["StudentConfig", "STUDENT_PRESETS", "resolve_student", "train_student", "kd_loss",
           "kd_loss_sum", "param_groups", "lr_factor", "main"]

# Public-code settings. imagenet-1k: SRe2L validate/train_FKD.sh (resnet18, batch 1024, --cos,
# -T 20, cutmix, AdamW defaults lr 1e-3 / wd 0.01, RandomResizedCrop(224, scale (0.08, 1)));
# 300 epochs as in SRe2L and in the GUARD paper ("train a ResNet18 ... for 300 epochs").
# imagenette: the same recipe (the GUARD paper's ImageNet-subset evaluation, 300 epochs).
# tiny-imagenet: zeyuanyin/tiny-imagenet script/train_kd.sh (linked from SRe2L's
# README_TINY): SGD lr 0.2, momentum 0.9, wd 1e-4 on every parameter, batch 256, 100 epochs,
# 5 linear warm-up epochs from 0.01 x lr then cosine, T 20 with the T^2 factor, no mixing.
# cifar10/cifar100: SRe2L small_dataset/relabel_cifar.py(.sh): AdamW lr 1e-3 wd 0.01 on every
# parameter, CosineAnnealingLR over 400 epochs, batch 128, T 30, Mixup alpha 0.8 (its crop is
# RandomCrop(32, padding=4), which this package replaces by RandomResizedCrop views).
# mnist: this package's CPU-sized run on the bundled digits (not a paper setting).
STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-1k": dict(model="resnet18", image_size=224, epochs=300, batch_size=1024,
                        optimizer="adamw", lr=0.001, weight_decay=0.01, decay_1d=False,
                        temperature=20.0, loss_scale="none", mix="cutmix", min_scale=0.08),
    "imagenette": dict(model="resnet18", image_size=224, epochs=300, batch_size=1024,
                       optimizer="adamw", lr=0.001, weight_decay=0.01, decay_1d=False,
                       temperature=20.0, loss_scale="none", mix="cutmix", min_scale=0.08),
    "tiny-imagenet": dict(model="resnet18_small", image_size=64, epochs=100, batch_size=256,
                          optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
                          decay_1d=True, warmup_epochs=5, warmup_start=0.01,
                          temperature=20.0, loss_scale="T2", mix="none", min_scale=0.08),
    "cifar10": dict(model="resnet18_small", image_size=32, epochs=400, batch_size=128,
                    optimizer="adamw", lr=0.001, weight_decay=0.01, decay_1d=True,
                    temperature=30.0, loss_scale="none", mix="mixup", min_scale=0.08),
    "cifar100": dict(model="resnet18_small", image_size=32, epochs=400, batch_size=128,
                     optimizer="adamw", lr=0.001, weight_decay=0.01, decay_1d=True,
                     temperature=30.0, loss_scale="none", mix="mixup", min_scale=0.08),
    "mnist": dict(model="resnet18", image_size=32, epochs=30, batch_size=50, optimizer="adamw",
                  lr=0.001, weight_decay=0.01, decay_1d=False, temperature=20.0,
                  loss_scale="none", mix="cutmix", min_scale=0.25),
}
OPTIMIZERS = ("adamw", "sgd")
LOSS_SCALES = ("none", "T2")

# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "device", "val_every"}
# view settings: in replay mode they are the store's (None here: take them from it)
_VIEW_FIELDS = ("image_size", "batch_size", "min_scale", "max_scale", "mix", "cutmix_alpha",
                "mixup_alpha", "seed")
# online-mode view defaults the presets leave out (the public code's values; seed 0 ours)
_VIEW_DEFAULTS = dict(seed=0, max_scale=1.0, cutmix_alpha=1.0, mixup_alpha=0.8)


@dataclass
class StudentConfig:
    """Student training. batch_size is the global batch (all processes); lr per step group as
    in torch; image_size is the student's input side (the views' out_size).

    View fields (image_size, batch_size, min_scale, max_scale, mix, *_alpha, seed): online
    mode draws its views with them; in replay mode they must equal the relabel folder's (None
    takes the folder's value). resolve_student fills them from the preset only in online
    mode (no soft_labels), so a replayed run follows its relabel folder unless told
    otherwise -- and then says where they differ."""

    out: str = "runs/student"
    preset: str = "mnist"
    distilled: str | None = None    # distilled-set folder (replay default: the store's)
    soft_labels: str | None = None  # relabel folder: replay its views and logits
    teacher: str | None = None      # teacher.pt: online mode (no soft_labels)
    model: str = "resnet18"
    model_options: dict = field(default_factory=dict)  # e.g. {"width": 16} for convnet
    epochs: int = 30
    # views: None = the relabel folder's (replay); online mode needs them all set
    image_size: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    min_scale: float | None = None
    max_scale: float | None = None
    mix: str | None = None
    cutmix_alpha: float | None = None
    mixup_alpha: float | None = None
    optimizer: str = "adamw"
    lr: float = 0.001
    momentum: float = 0.9           # sgd only
    betas: tuple = (0.9, 0.999)     # adamw only
    weight_decay: float = 0.01
    decay_1d: bool = False          # also decay biases / norm weights (public AdamW path: no)
    warmup_epochs: int = 0
    warmup_start: float = 0.01      # warm-up starts at this fraction of lr
    temperature: float = 20.0
    loss_scale: str = "none"        # "none" (public train_FKD) or "T2"
    accum_steps: int = 1            # micro-batches per step (public --gradient-accumulation-steps)
    init_seed: int = 0              # the student's weight initialisation
    mean: list | None = None        # normalization inside the student (default: the teacher's)
    std: list | None = None
    val_data: str | None = None     # dataset name for validation accuracy (get_data)
    val_root: str | None = None
    max_val: int | None = None
    val_every: int = 1
    device: str = "auto"
    resume: bool = False
    progress: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d


def resolve_student(overrides: dict[str, Any] | None = None) -> StudentConfig:
    """StudentConfig from a preset (overrides["preset"], default "mnist") and overrides."""
    overrides = dict(overrides or {})
    preset = overrides.get("preset", "mnist")
    if preset not in STUDENT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(STUDENT_PRESETS)}")
    names = {f.name for f in fields(StudentConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown student setting(s) {bad}")
    values = dict(STUDENT_PRESETS[preset])
    if overrides.get("soft_labels") is not None:  # replay: views come from the folder
        values = {k: v for k, v in values.items() if k not in _VIEW_FIELDS}
    else:
        values = {**_VIEW_DEFAULTS, **values}
    return StudentConfig(**{**values, "preset": preset, **overrides})


# --------------------------------------------------------------------------- loss, optimizer

def kd_loss_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """sum over the batch of KL(softmax(t/T) || softmax(s/T)), in float32. Teacher logits of
    -inf (top-k stores) are classes of zero target mass and contribute 0."""
    logp = F.log_softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(logp, q, reduction="sum")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 20.0,
            loss_scale: str = "none") -> Tensor:
    """The public train_FKD loss: KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)),
    times T^2 when loss_scale == "T2"."""
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"unknown loss_scale {loss_scale!r}; known: {', '.join(LOSS_SCALES)}")
    loss = kd_loss_sum(student_logits, teacher_logits, temperature) / student_logits.shape[0]
    return loss * temperature ** 2 if loss_scale == "T2" else loss


def param_groups(model: nn.Module, weight_decay: float, decay_1d: bool) -> list[dict]:
    """Weight decay on weight tensors of more than one dimension only (the public
    get_parameters), or on everything (decay_1d=True)."""
    if decay_1d:
        return [dict(params=[p for p in model.parameters()], weight_decay=weight_decay)]
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if "weight" in name and p.dim() > 1 else rest).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def lr_factor(cfg: StudentConfig):
    """Per-epoch lr multiplier: linear warm-up from warmup_start, then cosine to 0 at the end
    (without warm-up exactly the public --cos lambda 0.5 * (1 + cos(pi * e / epochs)))."""
    warm, total = cfg.warmup_epochs, cfg.epochs

    def f(e: int) -> float:
        if e < warm:
            return cfg.warmup_start + (1.0 - cfg.warmup_start) * e / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (e - warm) / max(1, total - warm))))
    return f


# --------------------------------------------------------------------------- run folder

def _check_run_folder(out: Path, cfgd: dict, resume: bool) -> None:
    f = out / "config.json"
    if not f.exists():
        if resume:
            raise FileNotFoundError(f"resume: {out} holds no student run (no config.json); "
                                    "drop resume to start one")
        return
    old = json.loads(f.read_text())
    if not resume:
        raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) to "
                              "continue it or choose another out (nothing was overwritten)")
    diff = sorted(k for k in set(old) | set(cfgd)
                  if k not in _RESUMABLE_DIFF and old.get(k) != cfgd.get(k))
    if diff:
        raise ValueError(f"resume: {out} was run with different settings for {diff}; use the "
                         "same settings or another out")


def _val_acc(model: nn.Module, loader, device) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
    model.train(was)
    return correct / max(total, 1)


def _sources(cfg: StudentConfig, distilled, teacher, device):
    """The soft-label source (store or online), the distilled dict, the class count and the
    teacher's arch; fills cfg's view fields from the store. Raises naming the problem."""
    from guard_fast.distill import relabel as rl

    if cfg.soft_labels is not None and (teacher is not None or cfg.teacher is not None):
        raise ValueError("give soft_labels (replay a relabel folder) or a teacher (online), "
                         "not both")
    if cfg.soft_labels is not None:
        sl = Path(cfg.soft_labels)
        if not (sl / "config.json").is_file():
            raise FileNotFoundError(f"soft labels {sl} not found (no config.json): run the "
                                    "relabel stage first")
        scfg = json.loads((sl / "config.json").read_text())
        spec = scfg["views"]
        store_vals = {"image_size": spec["out_size"], **{k: spec[k] for k in _VIEW_FIELDS
                                                          if k != "image_size"}}
        for k, v in store_vals.items():
            mine = getattr(cfg, k)
            if mine is None:
                setattr(cfg, k, v)
            elif mine != v:
                raise ValueError(f"{k} = {mine!r} but the relabel folder {sl} was made with "
                                 f"{v!r}: views (and their soft labels) are stored per batch, "
                                 f"so use {k}={v!r} (or None) or relabel again")
        if distilled is None and cfg.distilled is not None:
            distilled = cfg.distilled
        if distilled is None:
            distilled = scfg["distilled"].get("path")
            if distilled is None:
                raise ValueError(f"{sl} was relabelled from an in-memory set: pass distilled")
        d, _ = rl._resolve_distilled(distilled)
        images = d["images"].float()
        n_st = scfg["distilled"]["n_images"]
        if images.shape[0] != n_st:
            raise ValueError(f"image count mismatch: the distilled set has {images.shape[0]} "
                             f"images but {sl} relabelled {n_st}")
        store = rl.SoftLabelStore(sl, images=images, device=device)
        if store.epochs_available < cfg.epochs:
            raise ValueError(f"{sl} stores soft labels for {store.epochs_available} epochs but "
                             f"{cfg.epochs} were requested: relabel with epochs >= {cfg.epochs} "
                             "(it resumes) or train fewer epochs")
        return store, d, store.num_classes, scfg["teacher"]["arch"]
    t = teacher if teacher is not None else cfg.teacher
    if t is None:
        raise ValueError("no soft labels: give soft_labels (a relabel folder; run the relabel "
                         "stage first) or a teacher for online relabelling")
    if distilled is None:
        distilled = cfg.distilled
    if distilled is None:
        raise ValueError("online mode needs the distilled set: give distilled")
    for k in _VIEW_FIELDS:
        if getattr(cfg, k) is None:
            raise ValueError(f"online mode: {k} must be set (it draws the views)")
    model, arch, _ = rl._resolve_teacher(t)
    d, _ = rl._resolve_distilled(distilled)
    images = d["images"].float()
    _, C, H, W = images.shape
    spec = rl.ViewSpec(n=images.shape[0], src_h=H, src_w=W, out_size=cfg.image_size,
                       batch_size=cfg.batch_size, seed=cfg.seed, min_scale=cfg.min_scale,
                       max_scale=cfg.max_scale, mix=cfg.mix, cutmix_alpha=cfg.cutmix_alpha,
                       mixup_alpha=cfg.mixup_alpha)
    src = rl.OnlineSoftLabels(model, images, spec, device)
    K = rl._num_classes(src.teacher, spec, images, device)
    src.num_classes = K
    return src, d, K, arch


def train_student(cfg: StudentConfig | None = None, *, distilled=None, teacher=None,
                  val_data=None, stop_after: int | None = None, **overrides) -> dict:
    """Train a student per cfg (or resolve_student(overrides)); returns the final metrics.

    distilled: the distilled set (folder, images.pt or dict) when not cfg.distilled / the
    store's. teacher: a module or teacher.pt path for online mode (else cfg.teacher).
    val_data: a Dataset of ([0, 1] image, label) for validation accuracy (else cfg.val_data).
    stop_after: end after this many epochs (checkpoint kept, no student.pt): a run cut short,
    which resume=True continues.
    """
    from guard_fast.runtime import dist_env as _dist_info, resolve_device
    from guard_fast.models import build_model

    if cfg is None:
        cfg = resolve_student(overrides)
    elif overrides:
        raise ValueError("give a StudentConfig or keyword settings, not both")
    else:
        cfg = dataclasses.replace(cfg)  # resolved below (view fields); the caller's stays as is
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if cfg.loss_scale not in LOSS_SCALES:
        raise ValueError(f"unknown loss_scale {cfg.loss_scale!r}; known: {', '.join(LOSS_SCALES)}")
    if cfg.epochs < 1 or cfg.accum_steps < 1 or cfg.temperature <= 0:
        raise ValueError("epochs and accum_steps must be positive and temperature > 0")
    rank, world, local_rank = _dist_info()
    device = resolve_device(cfg.device)
    we_init = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            we_init = True
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    source, d, K, tarch = _sources(cfg, distilled, teacher, device)
    labels = d["labels"].long()
    names = (d.get("meta") or {}).get("class_names")
    if int(labels.max()) >= K or (names is not None and len(names) > K):
        raise ValueError(f"class count mismatch: the distilled set has "
                         f"{max(int(labels.max()) + 1, len(names or []))} classes but the soft "
                         f"labels have {K}")
    N, C = d["images"].shape[:2]
    last = N % cfg.batch_size
    if world > 1 and (cfg.batch_size < world or 0 < last < world):
        raise ValueError(f"with {world} processes every batch needs >= {world} images: batch "
                         f"size {cfg.batch_size}, last batch {last}")
    mean = cfg.mean if cfg.mean is not None else tarch.get("mean")
    std = cfg.std if cfg.std is not None else tarch.get("std")
    if mean is None or std is None:
        raise ValueError("the student's normalization is unknown (the teacher has no mean/std): "
                         "set mean and std")
    out = Path(cfg.out)
    cfgd = cfg.to_dict()
    _check_run_folder(out, cfgd, cfg.resume)
    if world > 1:  # every rank has checked the folder before rank 0 writes to it
        import torch.distributed as dist

        dist.barrier()

    torch.manual_seed(cfg.init_seed)
    wrapped = build_model(cfg.model, num_classes=K, in_channels=C, mean=mean, std=std,
                          image_size=cfg.image_size, **cfg.model_options).to(device)
    train_model: nn.Module = wrapped
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    groups = param_groups(wrapped, cfg.weight_decay, cfg.decay_1d)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))

    start = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        ck = load_checkpoint(ckpt)
        wrapped.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["epoch"]) + 1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfgd)
        atomic_write_json(out / "run.json", {"status": "running", "stage": "student"})

    val_loader = None
    if rank == 0 and (val_data is not None or cfg.val_data):
        from guard_fast.data import get_data, make_loader

        if val_data is None:
            val_data = get_data(cfg.val_data, root=cfg.val_root, image_size=cfg.image_size).val
            if cfg.max_val:
                from guard_fast.data import random_subset as _subset

                val_data = _subset(val_data, cfg.max_val, 1)
        val_loader = make_loader(val_data, batch_size=256, shuffle=False)

    from tqdm.auto import tqdm

    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    metrics: dict = {}
    for epoch in range(start, end):
        train_model.train()
        t0 = time.perf_counter()
        # kd sum, teacher agreement, images: kept on the device (no host sync per step)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        views = source.views(epoch)
        bar = tqdm(range(source.num_batches), desc=f"student epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or rank != 0, leave=False)
        for b in bar:
            s, e = views.span(b)
            n_b = e - s
            mine = torch.tensor_split(torch.arange(n_b), world)[rank]
            x, t = source.batch(epoch, b, mine)
            opt.zero_grad(set_to_none=True)
            micro = torch.tensor_split(torch.arange(len(mine)), min(cfg.accum_steps, len(mine)))
            for m_i, m in enumerate(micro):
                sync = m_i == len(micro) - 1 or world == 1
                ctx = train_model.no_sync() if not sync else _null()
                with ctx:
                    logits = train_model(x[m])
                    ls = kd_loss_sum(logits, t[m], cfg.temperature)
                    # DDP averages gradients over ranks: scale by world so the result is the
                    # gradient of the global batch's batchmean
                    loss = ls * (world / n_b)
                    if cfg.loss_scale == "T2":
                        loss = loss * cfg.temperature ** 2
                    loss.backward()
                agree = (logits.argmax(1) == t[m].argmax(1)).sum()
                sums += torch.stack([ls.detach().double(), agree.double(),
                                     torch.tensor(float(len(m)), dtype=torch.float64,
                                                  device=device)])
            opt.step()
        lr_used = opt.param_groups[0]["lr"]  # this epoch's (the schedule steps per epoch)
        sched.step()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        sums = sums.cpu()
        vm = {}
        if rank == 0 and val_loader is not None and (
                (epoch + 1) % max(1, cfg.val_every) == 0 or epoch + 1 == cfg.epochs):
            vm = {"val_acc": _val_acc(wrapped, val_loader, device)}
        kd = float(sums[0] / sums[2])
        if cfg.loss_scale == "T2":
            kd *= cfg.temperature ** 2
        metrics = {"epoch": epoch + 1, "train_kd": kd,
                   "train_teacher_agree": float(sums[1] / sums[2]), "lr": lr_used,
                   "images_per_s": float(sums[2]) / (time.perf_counter() - t0), **vm}
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", metrics)
            atomic_torch_save(ckpt, {"model": wrapped.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "epoch": epoch})
            if cfg.progress:
                print(f"student epoch {epoch + 1}/{cfg.epochs}: kd {metrics['train_kd']:.5g} "
                      f"agree {metrics['train_teacher_agree']:.3f}"
                      + (f" val acc {vm['val_acc']:.4f}" if vm else ""), flush=True)
    done = end == cfg.epochs
    if rank == 0 and done:
        if not metrics and val_loader is not None:  # resumed a finished run
            metrics = {"val_acc": _val_acc(wrapped, val_loader, device)}
        atomic_torch_save(out / "student.pt", {
            "model": wrapped.state_dict(), "arch": {
                "model": cfg.model, "num_classes": K, "in_channels": int(C),
                "image_size": cfg.image_size, "mean": list(mean), "std": list(std),
                "data": tarch.get("data"), "options": dict(cfg.model_options)},
            "metrics": metrics})
        atomic_write_json(out / "run.json", {"status": "complete", "stage": "student",
                                             "metrics": metrics,
                                             "student": str(out / "student.pt")})
    if we_init:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv: list[str] | None = None) -> int:
    """``python -m guard_fast.distill.student --config cfg.json [--stop-after K]`` (also under
    torchrun): train a student from a JSON file of StudentConfig fields."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m guard_fast.distill.student",
                                description="Train a student on FKD soft labels.")
    p.add_argument("--config", required=True, help="JSON file of StudentConfig fields")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs")
    a = p.parse_args(argv)
    try:
        cfg = resolve_student(json.loads(Path(a.config).read_text()))
        m = train_student(cfg, stop_after=a.stop_after)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
