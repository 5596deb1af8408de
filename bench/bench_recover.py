"""Recover throughput: iterations/s and images/s of guard_fast's synthesis loop against a
straightforward loop written the way SRe2L's public code is.

  straightforward  one ipc id per batch; a Python forward hook on every BatchNorm layer that
                   takes the variance of permute().contiguous() of its input; torchvision's
                   RandomResizedCrop + RandomHorizontalFlip on the batch tensor and a random
                   roll (global RNG); loss.item() every iteration (the public code's
                   best-cost check); Adam (betas 0.5/0.9), cosine lr, per-channel clip.
  guard_fast       guard_fast.distill.recover.synthesis_steps: no hooks (one var_mean per
                   BatchNorm input), per-group statistics, `group` ipc ids per batch, optional
                   channels_last / torch.compile / bf16 autocast.

Images/s counts synthesized images advanced by one iteration per second (batch * it/s), so
variants with different group sizes compare directly. Before timing, one iteration of each
variant is checked: the grouped loss per group must equal the separate runs' losses.

    python bench/bench_recover.py --quick            # CPU, ResNet-18 at 64 px, 10 classes
    python bench/bench_recover.py --device cuda      # ResNet-18 at 224 px, 100 images per group
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _teacher(args, device):
    from guard_fast.models import build_model

    torch.manual_seed(0)
    m = build_model(args.model, num_classes=args.classes, image_size=args.image_size)
    # non-trivial running statistics: a few train-mode forwards on random images
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, 3, args.image_size, args.image_size))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(device)


def _cfg(args, group):
    from guard_fast.config import RecoverConfig

    return RecoverConfig(ipc=max(group, 1), iterations=1000, lr=0.25, r_bn=0.01, crop=True,
                         flip=True, jitter=min(32, args.image_size // 7), jitter_mode="positive",
                         group_size=group, progress=False)


class _Straightforward:
    """The public code's loop (SRe2L recover/data_synthesis.py), one ipc id per batch."""

    def __init__(self, teacher, classes, size, device, lr=0.25, r_bn=0.01, first=10.0,
                 jitter=32, iterations=1000):
        from torchvision import transforms

        self.teacher, self.size, self.lr, self.r_bn, self.jitter = teacher, size, lr, r_bn, jitter
        self.iterations = iterations
        self.layers = []
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                self.layers.append(_Hook(m))
        self.rescale = [first] + [1.0] * (len(self.layers) - 1)
        self.targets = torch.arange(classes, device=device)
        self.x = torch.randn(classes, 3, size, size, device=device, requires_grad=True)
        self.opt = torch.optim.Adam([self.x], lr=lr, betas=[0.5, 0.9], eps=1e-8)
        self.aug = transforms.Compose([transforms.RandomResizedCrop(size),
                                       transforms.RandomHorizontalFlip()])
        self.it = 0
        self.best = 1e4

    def step(self):
        for g in self.opt.param_groups:
            g["lr"] = 0.5 * (1 + math.cos(math.pi * self.it / self.iterations)) * self.lr
        xj = self.aug(self.x)
        xj = torch.roll(xj, shifts=(random.randint(0, self.jitter), random.randint(0, self.jitter)),
                        dims=(2, 3))
        self.opt.zero_grad()
        out = self.teacher(xj)
        loss = F.cross_entropy(out, self.targets) + self.r_bn * sum(
            h.r * s for h, s in zip(self.layers, self.rescale))
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(-2.2, 2.7)
        if self.best > loss.item():  # the public code's best-cost check: a host sync
            self.best = loss.item()
        self.it += 1

    def close(self):
        for h in self.layers:
            h.handle.remove()


class _Hook:
    def __init__(self, m):
        self.handle = m.register_forward_hook(self.fn)

    def fn(self, module, inp, out):
        c = inp[0].shape[1]
        mean = inp[0].mean([0, 2, 3])
        var = inp[0].permute(1, 0, 2, 3).contiguous().reshape([c, -1]).var(1, unbiased=False)
        self.r = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def _guard_fast_runner(teacher, args, device, group, channels_last=False, compile_=False,
                       amp=None):
    from guard_fast.distill.recover import Synthesizer, synthesis_steps

    cfg = _cfg(args, group)
    cfg.channels_last = channels_last
    syn = Synthesizer(teacher, cfg.r_bn, cfg.first_bn_multiplier, groups=group).to(device)
    if channels_last:
        syn.net.to(memory_format=torch.channels_last)
    fn = torch.compile(syn, dynamic=False) if compile_ else syn
    n = args.classes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(group * n, 3, args.image_size, args.image_size, generator=g).to(device)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    targets = torch.arange(n, device=device).repeat(group)
    lo = torch.full((1, 3, 1, 1), -2.2, device=device)
    hi = torch.full((1, 3, 1, 1), 2.7, device=device)
    state = {"it": 0}

    def step():
        synthesis_steps(fn, x, opt, targets, cfg, chunk=0, group=list(range(group)),
                        size=args.image_size, lo=lo, hi=hi, start=state["it"],
                        stop=state["it"] + 1, amp_dtype=amp)
        state["it"] += 1
    return step


def check_grouped_equals_separate(teacher, args, device, group) -> float:
    """Max relative difference between the per-group losses of one grouped iteration and the
    same groups run separately (same seed, same augmentation draws)."""
    from guard_fast.distill.recover import Synthesizer, apply_augment, draw_augment, _rng

    cfg = _cfg(args, group)
    n, s = args.classes, args.image_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(group * n, 3, s, s, generator=g).to(device)
    y = torch.arange(n, device=device).repeat(group)
    views = [apply_augment(x[i * n:(i + 1) * n], draw_augment(
        _rng(0, i, 0, 0), s, True, True, cfg.jitter, "positive", 0.08, 1.0), s) for i in range(group)]
    syn = Synthesizer(teacher, cfg.r_bn, groups=group)
    with torch.no_grad():
        grouped = syn(torch.cat(views), y)[0]
        syn.set_groups(1)
        separate = torch.stack([syn(v, y[:n])[0][0] for v in views])
    return float(((grouped - separate).abs() / separate.abs()).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer reps (CPU: about 2 min)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=None, help="px (default: 64 CPU, 224 CUDA)")
    ap.add_argument("--classes", type=int, default=None, help="images per group (default: 10 CPU, 100 CUDA)")
    ap.add_argument("--groups", default=None, help="comma list of group sizes (default: 2,4 CPU; 2,4,8 CUDA)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma list: eager, channels_last, compile, bf16 (default: all that apply)")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    from harness import append_result, table, time_fn

    from guard_fast.runtime import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.image_size = args.image_size or (224 if cuda else 64)
    args.classes = args.classes or (100 if cuda else 10)
    groups = [int(v) for v in (args.groups or ("2,4,8" if cuda else "2,4")).split(",")]
    reps = args.reps or (10 if cuda else (3 if args.quick else 5))
    variants = (args.variants or ("eager,channels_last,compile,bf16" if cuda else
                                  "eager,channels_last,compile")).split(",")
    teacher = _teacher(args, device)
    rows = []

    def record(name, group, fn, per_call_groups, **extra):
        r = time_fn(fn, warmup=2, reps=reps, device=device)
        its = 1e3 / r["median_ms"]
        r.update(area="recover", variant=name, group=group, model=args.model,
                 image_size=args.image_size, images_per_group=args.classes,
                 device_type=device.type, iters_per_s=its,
                 images_per_s=its * args.classes * per_call_groups, quick=args.quick, **extra)
        r["speedup_vs_straightforward"] = r["images_per_s"] / (rows[0] if rows else r)["images_per_s"]
        rows.append(r)
        append_result("recover", r, args.results_dir, device=device)  # at once: a cut run keeps it
        print(f"{name:34s} group {group}: {r['images_per_s']:8.1f} img/s "
              f"({r['median_ms']:.0f} ms/iteration)", flush=True)

    random.seed(0)
    torch.manual_seed(0)
    base = _Straightforward(teacher, args.classes, args.image_size, device,
                            jitter=min(32, args.image_size // 7))
    record("straightforward (public-code loop)", 1, base.step, 1)
    base.close()
    record("guard_fast eager", 1, _guard_fast_runner(teacher, args, device, 1), 1)
    for gsz in groups:
        err = check_grouped_equals_separate(teacher, args, device, gsz)
        print(f"group {gsz}: max relative loss difference grouped vs separate {err:.2e}")
        if err > 1e-4:
            raise SystemExit(f"grouped losses differ from separate ones by {err:.2e}")
        for v in variants:
            if v == "bf16" and not cuda:
                continue
            kw = dict(channels_last=v in ("channels_last", "compile", "bf16"),
                      compile_=v in ("compile", "bf16"),
                      amp=torch.bfloat16 if v == "bf16" else None)
            name = "guard_fast " + {"eager": "eager", "channels_last": "channels_last",
                                    "compile": "channels_last+compile",
                                    "bf16": "channels_last+compile+bf16"}[v]
            try:
                record(name, gsz, _guard_fast_runner(teacher, args, device, gsz, **kw), gsz,
                       grouped_vs_separate_rel_diff=err)
            except Exception as e:  # a variant that cannot run here is reported, not hidden
                print(f"{name} group {gsz}: skipped ({type(e).__name__}: {str(e)[:200]})")
    print(table(rows, ["variant", "group", "images_per_s", "iters_per_s", "median_ms",
                       "speedup_vs_straightforward"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
