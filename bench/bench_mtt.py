"""MTT / TESLA: peak memory and time of one distillation iteration against syn_steps, and
against a straightforward loop written the way the public MTT code is.

  straightforward  a flattened-parameter module (the net's Parameters replaced by views of
                   one flat vector set as attributes before every call, as MTT's
                   ReparamModule does), the list of student parameters kept, one
                   autograd.grad(create_graph=True) per step, the loss, one backward; its
                   network has PyTorch's nn.GroupNorm and nn.AvgPool2d, as the public code's
  mtt              guard_fast.distill.mtt.unroll_loss (torch.func.functional_call on a
                   flat vector) and one backward: the same exact gradient, on guard_fast's
                   ConvNet (its InstanceNorm and AvgPool2x2: fused C++ kernels on the CPU)
  mtt-torch-layers the same on PyTorch's nn.GroupNorm and nn.AvgPool2d (what the kernels buy)
  tesla            guard_fast.distill.mtt.tesla_grads: TESLA's constant-memory gradient
  tesla-exact      tesla_grads(exact=True): the exact gradient by a reverse sweep over the
                   stored parameter vectors

One iteration = syn_steps student steps on batches of batch_syn synthetic images (DSA
augmented) and the image and step-size gradients. Peak memory: on CPU the exact peak of live
tensor bytes (bench/harness.peak_tensor_mb), on CUDA max_memory_allocated. Before timing, the
straightforward loop's gradients are checked against mtt's (and tesla-exact's against mtt's).

    python bench/bench_mtt.py --quick                 # CPU, ConvNet width 32, 32 px, 10 images
    python bench/bench_mtt.py --device cuda           # ConvNet width 128, 32 px, 100 images
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
VARIANTS = ("straightforward", "mtt", "mtt-torch-layers", "tesla", "tesla-exact")


def _torch_layers(net: nn.Module) -> nn.Module:
    """A copy of net with guard_fast's InstanceNorm and AvgPool2x2 modules replaced by
    PyTorch's nn.GroupNorm and nn.AvgPool2d (same parameters): the public code's network."""
    from guard_fast.models.instance_norm import InstanceNorm
    from guard_fast.models.pool import AvgPool2x2

    net = copy.deepcopy(net)
    for parent in net.modules():
        for name, m in list(parent.named_children()):
            if isinstance(m, InstanceNorm):
                gn = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=True)
                gn.load_state_dict(m.state_dict())
                setattr(parent, name, gn.to(m.weight.device, m.weight.dtype))
            elif isinstance(m, AvgPool2x2):
                setattr(parent, name, nn.AvgPool2d(kernel_size=2, stride=2))
    return net


class _FlatModule(nn.Module):
    """The public code's way: the net's Parameters deleted and replaced, before each call,
    by views of the flat vector it is given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.slots = [(m, n, p.shape, p.numel()) for m in net.modules()
                      for n, p in list(m.named_parameters(recurse=False))]
        self.flat = torch.cat([p.detach().reshape(-1) for m, n, _, _ in self.slots
                               for p in [getattr(m, n)]])
        for m, n, _, _ in self.slots:
            delattr(m, n)

    def forward(self, x, flat_param):
        off = 0
        for m, n, shape, k in self.slots:
            setattr(m, n, flat_param[off:off + k].view(shape))
            off += k
        return self.net(x)


def _straightforward(fm, w0, wT, images, labels, lr, plan):
    from guard_fast.data import dsa

    student = [w0.detach().clone().requires_grad_(True)]
    for idx, d in plan:
        x = dsa.apply(images[idx], d)
        ce = F.cross_entropy(fm(x, flat_param=student[-1]), labels[idx])
        grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
        student.append(student[-1] - lr * grad)
    num = F.mse_loss(student[-1], wT, reduction="sum")
    den = F.mse_loss(w0, wT, reduction="sum")
    loss = num / den
    return torch.autograd.grad(loss, (images, lr))


def _setup(args, device, steps):
    from guard_fast.data import dsa
    from guard_fast.distill import mtt as M
    from guard_fast.models import build_model
    from guard_fast.models.flat import FlatNet

    torch.manual_seed(0)
    net = build_model("convnet", 10, 3, image_size=args.image_size, width=args.width).to(device)
    flat = FlatNet(net)
    w0 = flat.flatten()
    wT = w0 + 0.01 * torch.randn_like(w0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, device=device,
                         requires_grad=True)
    labels = torch.arange(10, device=device).repeat_interleave(args.images // 10)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    plan = M.make_plan(args.images, args.batch_syn or args.images, steps, dsa.DSA_STRATEGY,
                       args.image_size, torch.Generator().manual_seed(1))
    return M, flat, w0, wT, images, labels, lr, plan


def _fn(variant, M, flat, w0, wT, images, labels, lr, plan, fm):
    from guard_fast.models.flat import FlatNet

    if variant == "straightforward":
        return lambda: _straightforward(fm, w0, wT, images, labels, lr, plan)
    if variant in ("mtt", "mtt-torch-layers"):
        f = flat if variant == "mtt" else FlatNet(_torch_layers(flat.net))
        return lambda: torch.autograd.grad(M.unroll_loss(f, w0, wT, images, labels, lr, plan),
                                           (images, lr))
    return lambda: M.tesla_grads(flat, w0, wT, images, labels, lr, plan,
                                 exact=variant == "tesla-exact")[1:]


def _check(fns) -> tuple[float, float | None]:
    """(max relative difference of the exact variants' image gradients against mtt's,
    ||g_tesla - g_exact|| / ||g_exact|| of the image gradient: what TESLA's gradient drops)."""
    ref = fns["mtt"]()[0]
    worst = 0.0
    for v in ("straightforward", "mtt-torch-layers", "tesla-exact"):
        if v in fns:
            g = fns[v]()[0]
            worst = max(worst, float((g - ref).abs().max() / ref.abs().max()))
    drop = float((fns["tesla"]()[0] - ref).norm() / ref.norm()) if "tesla" in fns else None
    return worst, drop


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer reps, the CPU sizes")
    ap.add_argument("--width", type=int, default=None, help="ConvNet width (32 CPU, 128 CUDA)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=None, help="synthetic images (10 CPU, 100 CUDA)")
    ap.add_argument("--batch-syn", type=int, default=None)
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    from harness import append_result, cuda_peak_mb, peak_tensor_mb, table, time_interleaved

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.width = args.width or (128 if cuda else 32)
    args.images = args.images or (100 if cuda else 10)
    reps = args.reps or (2 if args.quick else 5)
    variants = [v for v in args.variants.split(",") if v]
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        M, flat, w0, wT, images, labels, lr, plan = _setup(args, device, steps)
        fm = _FlatModule(_torch_layers(flat.net)).to(device)
        fns = {v: _fn(v, M, flat, w0, wT, images, labels, lr, plan, fm) for v in variants}
        err, drop = _check(fns) if "mtt" in fns else (None, None)
        ref = "straightforward" if "straightforward" in fns else None
        timed = time_interleaved(fns, warmup=1, reps=reps, device=device, reference=ref)
        for v in variants:
            t = timed[v]
            peak = cuda_peak_mb(fns[v], device) if cuda else round(peak_tensor_mb(fns[v]), 2)
            row = {"bench": "mtt", "variant": v, "syn_steps": steps, "width": args.width,
                   "images": args.images, "batch_syn": args.batch_syn or args.images,
                   "image_size": args.image_size, "ms_per_iteration": round(t["median_ms"], 2),
                   "p20_ms": round(t["p20_ms"], 2), "p80_ms": round(t["p80_ms"], 2),
                   "time_vs_straightforward": (round(t["ratio_vs_ref"], 3) if ref else None),
                   "ratio_p20": round(t["ratio_p20"], 3) if ref else None,
                   "ratio_p80": round(t["ratio_p80"], 3) if ref else None,
                   "timing": f"interleaved, {reps} rounds",
                   "peak_mem_mb": peak, "max_rel_err_vs_mtt": err, "device_type": device.type,
                   "tesla_vs_exact_rel_diff": drop if v == "tesla" else None}
            rows.append(append_result("mtt", row, args.results_dir, device))
    print(table(rows, ["variant", "syn_steps", "ms_per_iteration", "time_vs_straightforward",
                       "ratio_p20", "ratio_p80", "peak_mem_mb", "max_rel_err_vs_mtt",
                       "tesla_vs_exact_rel_diff"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
