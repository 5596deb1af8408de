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

Settings: guard_fast.config.StudentConfig; presets (guard_fast.config.STUDENT_PRESETS): the
public code's runs, named by dataset, plus a CPU "mnist" one.

Run folder (cfg.out):
  config.json     the resolved config, written first (a different existing run -> error;
                  a folder of an earlier version, without "stage", still resumes)
  metrics.jsonl   one row per epoch: train KD loss, agreement with the teacher, lr, val acc
  checkpoint.pt   latest epoch: model, optimizer, scheduler, epoch (atomic)
  student.pt      the final student, written last, in the one classifier format of
                  teacher.pt ({"model": Normalized state_dict, "arch": {..., "options":
                  model_options}, "metrics": {...}}), so
                  guard_fast.runtime.load_classifier(student.pt) rebuilds it
  run.json        status and final metrics

Determinism: the model is initialised from cfg.init_seed and every batch is a function of the
views of (seed, epoch), so a run stopped after any epoch and resumed (resume=True) ends with
the same weights as an uninterrupted one. Multi-process (torchrun, env RANK/WORLD_SIZE):
every rank reads the same global batch of views and builds and trains on its contiguous
share of its rows (losses scaled so that DDP's gradient mean equals the single-process
batchmean gradient). BatchNorm statistics are per process, as with the public code's
DataParallel chunks; the result equals one process exactly only for models without batch
statistics (e.g. the instance-norm ConvNet).

Command line: ``python -m guard_fast.train student [options] [--config cfg.json]
[--stop-after K]`` (options and the JSON object are StudentConfig's fields; works under
torchrun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guard_fast.config.student import (LOSS_SCALES, VIEW_FIELDS, StudentConfig, resolve_student,
                                       validate_student)
from guard_fast.data import softlabels as rl
from guard_fast.runtime import (DivergenceWatch, RunFolder, StepWatch, all_gather_object,
                                classifier_arch, distributed,
                                load_training_state, resolve_device, save_classifier,
                                save_training_state)

__all__ = ["train_student", "kd_loss", "kd_loss_sum", "param_groups", "lr_factor"]

# fields that may differ between a run and its resumption
_RESUMABLE_DIFF = {"resume", "progress", "device", "val_every", "diverge_factor"}


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


# --------------------------------------------------------------------------- soft labels

def _replay_source(cfg: StudentConfig, distilled, device):
    """A relabel folder's views and logits. The view fields of cfg are filled from the folder
    (None) or must equal it: the views and their soft labels are stored per batch."""
    sl = Path(cfg.soft_labels)
    scfg = rl.store_config(sl)
    spec = scfg["views"]
    store_vals = {"image_size": spec["out_size"], **{k: spec[k] for k in VIEW_FIELDS
                                                      if k != "image_size"}}
    for k, v in store_vals.items():
        mine = getattr(cfg, k)
        if mine is None:
            setattr(cfg, k, v)
        elif mine != v:
            raise ValueError(f"{k} = {mine!r} but the relabel folder {sl} was made with "
                             f"{v!r}: views (and their soft labels) are stored per batch, "
                             f"so use {k}={v!r} (or None) or relabel again")
    if distilled is None:
        distilled = cfg.distilled if cfg.distilled is not None else scfg["distilled"].get("path")
        if distilled is None:
            raise ValueError(f"{sl} was relabelled from an in-memory set: pass distilled")
    d, _ = rl.resolve_distilled(distilled)
    store = rl.SoftLabelStore(sl, images=d["images"].float(), device=device)
    if store.epochs_available < cfg.epochs:
        raise ValueError(f"{sl} stores soft labels for {store.epochs_available} epochs but "
                         f"{cfg.epochs} were requested: relabel with epochs >= {cfg.epochs} "
                         "(it resumes) or train fewer epochs")
    return store, d, store.num_classes, scfg["teacher"]["arch"]


def _online_source(cfg: StudentConfig, distilled, teacher, device):
    """The teacher run on the views of cfg's view fields as they are drawn (nothing stored)."""
    t = teacher if teacher is not None else cfg.teacher
    if t is None:
        raise ValueError("no soft labels: give soft_labels (a relabel folder; run the relabel "
                         "stage first) or a teacher for online relabelling")
    if distilled is None:
        distilled = cfg.distilled
    if distilled is None:
        raise ValueError("online mode needs the distilled set: give distilled")
    for k in VIEW_FIELDS:
        if getattr(cfg, k) is None:
            raise ValueError(f"online mode: {k} must be set (it draws the views)")
    d, _ = rl.resolve_distilled(distilled)
    images = d["images"].float()
    _, C, H, W = images.shape
    spec = rl.ViewSpec(n=images.shape[0], src_h=H, src_w=W, out_size=cfg.image_size,
                       batch_size=cfg.batch_size, seed=cfg.seed, min_scale=cfg.min_scale,
                       max_scale=cfg.max_scale, mix=cfg.mix, cutmix_alpha=cfg.cutmix_alpha,
                       mixup_alpha=cfg.mixup_alpha)
    src = rl.OnlineSoftLabels(t, images, spec, device)
    return src, d, src.num_classes, src.arch


def _sources(cfg: StudentConfig, distilled, teacher, device):
    """The soft-label source (store or online), the distilled dict, the class count and the
    teacher's arch; fills cfg's view fields from the store. Raises naming the problem."""
    if cfg.soft_labels is not None and (teacher is not None or cfg.teacher is not None):
        raise ValueError("give soft_labels (replay a relabel folder) or a teacher (online), "
                         "not both")
    if cfg.soft_labels is not None:
        return _replay_source(cfg, distilled, device)
    return _online_source(cfg, distilled, teacher, device)


def _check_data(cfg: StudentConfig, ds: dict, K: int, world: int) -> int:
    """The distilled set against the soft labels and the process count; returns its channels."""
    labels = ds["labels"].long()
    names = (ds.get("meta") or {}).get("class_names")
    if int(labels.max()) >= K or (names is not None and len(names) > K):
        raise ValueError(f"class count mismatch: the distilled set has "
                         f"{max(int(labels.max()) + 1, len(names or []))} classes but the soft "
                         f"labels have {K}")
    N, C = ds["images"].shape[:2]
    last = N % cfg.batch_size
    if world > 1 and (cfg.batch_size < world or 0 < last < world):
        raise ValueError(f"with {world} processes every batch needs >= {world} images: batch "
                         f"size {cfg.batch_size}, last batch {last}")
    return int(C)


def _normalization(cfg: StudentConfig, tarch: dict) -> tuple[list, list]:
    """The mean and std inside the student: cfg's, else the teacher's."""
    mean = cfg.mean if cfg.mean is not None else tarch.get("mean")
    std = cfg.std if cfg.std is not None else tarch.get("std")
    if mean is None or std is None:
        raise ValueError("the student's normalization is unknown (the teacher has no mean/std): "
                         "set mean and std")
    return list(mean), list(std)


# --------------------------------------------------------------------------- training

class _Student:
    """The network being trained and its optimizer.

    wrapped: the Normalized model (takes [0, 1] pixels; what student.pt stores), built with
    cfg.model_options from cfg.init_seed. train_model: wrapped, under DDP with several
    processes. AdamW or SGD on param_groups, the lr_factor schedule stepped once per epoch."""

    def __init__(self, cfg: StudentConfig, arch: dict, device: torch.device, world: int):
        from guard_fast.models import build_model

        torch.manual_seed(cfg.init_seed)
        self.arch = arch
        self.wrapped = build_model(arch["model"], num_classes=arch["num_classes"],
                                   in_channels=arch["in_channels"], mean=arch["mean"],
                                   std=arch["std"], image_size=arch["image_size"],
                                   **arch["options"]).to(device)
        self.train_model: nn.Module = self.wrapped
        if world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[device.index] if device.type == "cuda" else None)
        groups = param_groups(self.wrapped, cfg.weight_decay, cfg.decay_1d)
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        else:
            self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))

    def resume(self, ckpt: Path) -> int:
        """Load checkpoint.pt when there is one; returns the first epoch still to train."""
        if not ckpt.exists():
            return 0
        ck = load_training_state(ckpt, self.wrapped, self.opt, self.sched)
        return int(ck["epoch"]) + 1

    def save(self, ckpt: Path, epoch: int) -> None:
        save_training_state(ckpt, epoch=epoch, model=self.wrapped, optimizer=self.opt,
                            scheduler=self.sched)


def _batch_step(cfg: StudentConfig, s: _Student, x: Tensor, t: Tensor, n_b: int, world: int,
                sums: Tensor) -> Tensor:
    """One optimizer step on this rank's rows x (teacher logits t) of a global batch of n_b
    views, in cfg.accum_steps micro-batches.

    Each micro-batch's loss is its KD sum times world / n_b: DDP averages the gradients over
    the ranks, so the step's gradient is that of the global batch's batchmean (times T^2
    with loss_scale "T2") however the rows are split over ranks and micro-batches; DDP
    synchronises on the last micro-batch only. Adds (KD sum, rows where the student's top
    class is the teacher's, rows) to sums, on the device (no host sync per step); returns the
    step's KD sum."""
    s.opt.zero_grad(set_to_none=True)
    step_kd = torch.zeros((), dtype=torch.float64, device=sums.device)
    micro = torch.tensor_split(torch.arange(len(x)), min(cfg.accum_steps, len(x)))
    for m_i, m in enumerate(micro):
        sync = m_i == len(micro) - 1 or world == 1
        with s.train_model.no_sync() if not sync else contextlib.nullcontext():
            logits = s.train_model(x[m])
            ls = kd_loss_sum(logits, t[m], cfg.temperature)
            loss = ls * (world / n_b)
            if cfg.loss_scale == "T2":
                loss = loss * cfg.temperature ** 2
            loss.backward()
        agree = (logits.argmax(1) == t[m].argmax(1)).sum()
        sums += torch.stack([ls.detach().double(), agree.double(),
                             torch.tensor(float(len(m)), dtype=torch.float64, device=sums.device)])
        step_kd = step_kd + ls.detach().double()
    s.opt.step()
    return step_kd


def _train_epoch(cfg: StudentConfig, epoch: int, s: _Student, source, d) -> dict:
    """One epoch over the source's batches: every rank builds and trains on its contiguous
    share of each global batch's rows. Returns the epoch's KD loss (batchmean, in the
    loss's scale), agreement with the teacher's top class, the lr it used (the schedule
    steps per epoch) and views per second, summed over the ranks."""
    from tqdm.auto import tqdm

    s.train_model.train()
    t0 = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)
    views = source.views(epoch)
    bar = tqdm(range(source.num_batches), desc=f"student epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress or not d.is_main, leave=False)
    watch = StepWatch("student")
    lr_used = s.opt.param_groups[0]["lr"]
    for b in bar:
        start, end = views.span(b)
        mine = torch.tensor_split(torch.arange(end - start), d.world)[d.rank]
        x, t = source.batch(epoch, b, mine)
        kd = _batch_step(cfg, s, x, t, end - start, d.world, sums)
        watch.observe(b, x=x, kd_sum=kd, lr=lr_used)  # teacher logits may be -inf (top-k)
    watch.check(f"epoch {epoch + 1}")
    s.sched.step()
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    sums = sums.cpu()
    kd = float(sums[0] / sums[2])
    if cfg.loss_scale == "T2":
        kd *= cfg.temperature ** 2
    return {"epoch": epoch + 1, "train_kd": kd, "train_teacher_agree": float(sums[1] / sums[2]),
            "lr": lr_used, "images_per_s": float(sums[2]) / (time.perf_counter() - t0)}


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


def _val_loader(cfg: StudentConfig, val_data):
    """Validation images: val_data, else cfg.val_data's validation split (a fixed random
    subset of max_val images where asked); None without either."""
    from guard_fast.data import get_data, make_loader, random_subset

    if val_data is None and not cfg.val_data:
        return None
    if val_data is None:
        val_data = get_data(cfg.val_data, root=cfg.val_root, image_size=cfg.image_size).val
        if cfg.max_val:
            val_data = random_subset(val_data, cfg.max_val, 1)
    return make_loader(val_data, batch_size=256, shuffle=False)


def _end_epoch(cfg: StudentConfig, epoch: int, metrics: dict, s: _Student, val_loader,
               folder: RunFolder, device) -> None:
    """Rank 0 after an epoch: validation when due, the metrics row, checkpoint.pt."""
    if val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
        metrics["val_acc"] = _val_acc(s.wrapped, val_loader, device)
    folder.log(metrics)
    s.save(folder.path("checkpoint.pt"), epoch)
    if cfg.progress:
        print(f"student epoch {epoch + 1}/{cfg.epochs}: kd {metrics['train_kd']:.5g} "
              f"agree {metrics['train_teacher_agree']:.3f}"
              + (f" val acc {metrics['val_acc']:.4f}" if "val_acc" in metrics else ""),
              flush=True)


def _settings(cfg: StudentConfig | None, overrides: dict) -> StudentConfig:
    """cfg (a copy: the view fields are resolved below, the caller's stays as is) or
    resolve_student(overrides); validated."""
    if cfg is None:
        return resolve_student(overrides)
    if overrides:
        raise ValueError("give a StudentConfig or keyword settings, not both")
    return validate_student(dataclasses.replace(cfg))


def train_student(cfg: StudentConfig | None = None, *, distilled=None, teacher=None,
                  val_data=None, stop_after: int | None = None, **overrides) -> dict:
    """Train a student per cfg (or resolve_student(overrides)); returns the final metrics.

    distilled: the distilled set (folder, images.pt or dict) when not cfg.distilled / the
    store's. teacher: a module or teacher.pt path for online mode (else cfg.teacher).
    val_data: a Dataset of ([0, 1] image, label) for validation accuracy (else cfg.val_data).
    stop_after: end after this many epochs (checkpoint kept, no student.pt): a run cut short,
    which resume=True continues.
    """
    cfg = _settings(cfg, overrides)
    with distributed(resolve_device(cfg.device)) as d:
        source, ds, K, tarch = _sources(cfg, distilled, teacher, d.device)
        C = _check_data(cfg, ds, K, d.world)
        mean, std = _normalization(cfg, tarch)
        folder = RunFolder(cfg.out, "student", cfg.to_dict(), resume=cfg.resume,
                           resumable=_RESUMABLE_DIFF, final="student.pt")
        folder.check()
        d.barrier()  # every rank has checked the folder before rank 0 writes to it
        arch = classifier_arch(cfg.model, K, C, cfg.image_size, mean, std, data=tarch.get("data"),
                               options=cfg.model_options)
        s = _Student(cfg, arch, d.device, d.world)
        start = s.resume(folder.path("checkpoint.pt")) if cfg.resume else 0
        val_loader = None
        if d.is_main:
            folder.start()
            val_loader = _val_loader(cfg, val_data)
        end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        metrics: dict = {}
        # the epochs a resumed run already did, as rank 0 logged them (every rank alike)
        done = all_gather_object(folder.history("train_kd") if d.is_main else None)[0]
        diverge = DivergenceWatch("student", cfg.diverge_factor, done)
        for epoch in range(start, end):
            metrics = _train_epoch(cfg, epoch, s, source, d)
            diverge.check(epoch + 1, metrics["train_kd"])   # the same on every rank (reduced)
            if d.is_main:
                _end_epoch(cfg, epoch, metrics, s, val_loader, folder, d.device)
        if d.is_main and end == cfg.epochs:
            if not metrics:  # resumed a finished run: its last epoch's row, as uninterrupted
                metrics = folder.last_log(epoch=cfg.epochs) or (
                    {"val_acc": _val_acc(s.wrapped, val_loader, d.device)}
                    if val_loader is not None else {})
            save_classifier(folder.path("student.pt"), s.wrapped, arch, metrics)
            folder.complete(metrics=metrics, student=str(folder.path("student.pt")))
    return metrics
