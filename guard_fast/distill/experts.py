"""Expert trajectories: MTT's buffer stage (Cazenavette et al., CVPR 2022, buffer.py).

Each of N experts is a freshly initialized ConvNet trained on the real training set with SGD
(lr_teacher 0.01, no momentum, no weight decay), batches of 256 augmented by DSA, for E
epochs; its flat parameter vector (guard_fast.models.flat order) is recorded at the start
and after every epoch, so trajectory[e] is the network after e epochs. MTT feeds the ConvNet
normalized images, or ZCA-whitened ones (--zca); DSA is applied in that space, as in the
public code. ``--regularizer guard`` (or gr) trains with squeeze's criterion instead of plain
cross-entropy (the penalty in the same input space, h in its units): trajectories of
GUARD-regularized training, which MTT then matches (a row the GUARD paper does not have).

Run folder (cfg.out; guard_fast.runtime.RunFolder rules): config.json, then one file per
expert rewritten atomically after every epoch, zca.pt with --zca, metrics.jsonl (one row
per finished expert), and buffer.json last (guard_fast.data.trajectories).

Determinism and resumption: expert k's initialization is seeded by (seed, k), epoch e's
batch order and augmentation by (seed, k, e); a run killed mid-expert and resumed continues
from that expert's last saved epoch and ends with the same parameters as an uninterrupted
run. Under torchrun expert k is trained by rank k % world.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch

from guard_fast.config.experts import ExpertsConfig, resolve_experts
from guard_fast.data.loader import mix_seed
from guard_fast.data.trajectories import (BUFFER_INDEX, InputSpace, build_net, expert_path,
                                          load_expert, save_expert)
from guard_fast.runtime import (NonFiniteError, RunFolder, atomic_torch_save, atomic_write_json,
                                check_finite_weights, distributed, resolve_device)

__all__ = ["experts", "EXPERT_REGULARIZERS"]

# the criteria that take the ConvNet's own inputs (the adversarial baselines attack [0, 1]
# pixels, which these networks never see)
EXPERT_REGULARIZERS = ("none", "guard", "gr")
_RESUMABLE_DIFF = {"resume", "progress", "device"}


class _Real:
    """The real train/val images in the experts' input space, on the device."""

    def __init__(self, cfg: ExpertsConfig, device: torch.device):
        from guard_fast.data.real import load_real
        from guard_fast.data.zca import ZCA

        real = load_real(cfg.data, cfg.data_root, cfg.image_size, cfg.channels)
        x, y = real.train_x, real.train_y
        if cfg.max_train:
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0xE1))
            keep = torch.randperm(len(y), generator=g)[:cfg.max_train]
            x, y = x[keep], y[keep]
        zca = ZCA.fit(x) if cfg.zca else None
        self.space = InputSpace(real.mean, real.std, zca)
        with torch.no_grad():
            self.x, self.y = self.space(x).to(device), y.to(device)
            self.vx, self.vy = self.space(real.val_x).to(device), real.val_y.to(device)
        self.real = real
        self.arch = dict(model=cfg.model, num_classes=real.num_classes, channels=x.shape[1],
                         image_size=x.shape[-1], width=cfg.width,
                         depth={"convnet": cfg.depth, "convnet_d4": 4, "convnet_d5": 5}[cfg.model],
                         norm=cfg.norm)


def _meta(cfg: ExpertsConfig, r: _Real, num_params: int) -> dict:
    return {"stage": "experts", "data": r.real.name, "arch": r.arch, "num_params": num_params,
            "epochs": cfg.epochs, "lr_teacher": cfg.lr_teacher, "zca": cfg.zca,
            "mean": list(r.real.mean), "std": list(r.real.std), "regularizer": cfg.regularizer,
            "dsa": cfg.dsa, "dsa_strategy": cfg.dsa_strategy}


@torch.no_grad()
def _accuracy(net, x, y, batch: int = 512) -> float:
    net.eval()
    correct = sum(int((net(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum())
                  for s in range(0, x.shape[0], batch))
    return correct / max(1, x.shape[0])


def _train_expert(cfg: ExpertsConfig, k: int, r: _Real, device: torch.device, meta: dict,
                  log) -> dict:
    """Train (or continue) expert k, saving its file after every epoch; returns its summary."""
    from guard_fast.data.dsa import train_epoch
    from guard_fast.losses.criterion import build_criterion
    from guard_fast.models.flat import FlatNet

    torch.manual_seed(mix_seed(cfg.seed, k))
    net = build_net(r.arch).to(device)
    flat = FlatNet(net)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_teacher, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    rows, accs, start = [flat.flatten().cpu()], [], 0
    old = load_expert(cfg.out, k)
    if old is not None:
        rows, accs, start = list(old["trajectory"]), list(old["val_acc"]), int(old["epochs_done"])
        flat.load(rows[-1].to(device))
        if old.get("optimizer"):
            opt.load_state_dict(old["optimizer"])
    crit = build_criterion(cfg)
    t0 = time.perf_counter()
    for e in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, k, e))
        loss = train_epoch(net, opt, r.x, r.y, cfg.batch_train, gen,
                           cfg.dsa_strategy if cfg.dsa else None,
                           lambda m, xb, yb: crit(m, xb, yb).loss)
        hint = "Lower --lr-teacher (or --lam with a regularizer)."
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise NonFiniteError("experts", f"expert {k}, epoch {e + 1}",
                                 {"train_loss": loss, "lr_teacher": cfg.lr_teacher}, hint)
        # a last step that broke the weights leaves the epoch's mean loss finite: the
        # expert's file (its resume point) is not overwritten with them
        check_finite_weights("experts", net, f"expert {k}, after epoch {e + 1}", hint)
        rows.append(flat.flatten().cpu())
        accs.append(_accuracy(net, r.vx, r.vy))
        done = e + 1
        save_expert(cfg.out, k, torch.stack(rows), meta, epochs_done=done, val_acc=accs,
                    optimizer=opt.state_dict() if done < cfg.epochs and cfg.momentum else None)
        if cfg.progress:
            log(f"expert {k + 1}/{cfg.num_experts} epoch {done}/{cfg.epochs}: train loss "
                f"{loss:.4f} val acc {accs[-1]:.4f}")
    return {"expert": k, "val_acc": accs[-1] if accs else None,
            "seconds": round(time.perf_counter() - t0, 2)}


def experts(cfg: ExpertsConfig | dict | None = None, log=print) -> dict:
    """Train the expert buffer per cfg (see the module docstring); returns its summary."""
    cfg = resolve_experts(cfg) if not isinstance(cfg, ExpertsConfig) else cfg
    if cfg.regularizer not in EXPERT_REGULARIZERS:
        raise ValueError(f"--regularizer {cfg.regularizer}: experts train with "
                         f"{', '.join(EXPERT_REGULARIZERS)} (the adversarial baselines attack "
                         "[0, 1] pixels, not the normalized inputs the experts see)")
    with distributed(resolve_device(cfg.device)) as d:
        folder = RunFolder(cfg.out, "experts", asdict(cfg), resume=cfg.resume,
                           resumable=_RESUMABLE_DIFF, final=BUFFER_INDEX)
        folder.check()
        d.barrier()
        r = _Real(cfg, d.device)
        probe = build_net(r.arch)
        meta = _meta(cfg, r, sum(p.numel() for p in probe.parameters()))
        if d.is_main:
            folder.start()
            if r.space.zca is not None:
                atomic_torch_save(folder.path("zca.pt"), r.space.zca.state())
        d.barrier()
        for k in range(d.rank, cfg.num_experts, d.world):
            done = load_expert(cfg.out, k)
            if done is not None and done["epochs_done"] == cfg.epochs:
                continue
            folder.log(_train_expert(cfg, k, r, d.device, meta, log if d.is_main else _quiet))
        d.barrier()
        summary = {"experts": cfg.num_experts, "epochs": cfg.epochs,
                   "num_params": meta["num_params"]}
        if d.is_main:
            files = [expert_path(cfg.out, k).name for k in range(cfg.num_experts)]
            accs = [load_expert(cfg.out, k)["val_acc"][-1] for k in range(cfg.num_experts)]
            summary["val_acc_mean"] = sum(accs) / len(accs)
            atomic_write_json(folder.path(BUFFER_INDEX), {"meta": meta, "experts": files})
            folder.complete(**summary)
        d.barrier()
    return summary


def _quiet(*a, **k) -> None:
    pass

