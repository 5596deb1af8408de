"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted
Adversarial Examples with a Fast Adaptive Boundary Attack", ICML 2020), L-inf, in the
multi-target form AutoAttack "standard" runs (Croce & Hein, ICML 2020).

For each target class t (the 2nd..(n_target_classes + 1)th most likely class of the clean
point) and each still-robust point, iterate from x_1 = x (a random start from restart 2 on):

* linearize the decision function f = Z_t - Z_y at x_k: the hyperplane
  {z : f(x_k) + <grad f(x_k), z - x_k> = 0};
* d_1, d_2 = the minimal L-inf steps that take x_k and the original x onto that hyperplane
  while staying in the [0, 1] box (`project_linf_box`);
* alpha = clamp(||d_1|| / (||d_1|| + ||d_2||), 0, alpha_max) biases the step toward the
  original point; x_{k+1} = clamp((x_k + eta d_1)(1 - alpha) + (x + eta d_2) alpha, 0, 1)
  with overshoot eta = 1.05;
* if x_{k+1} is misclassified, remember it when its L-inf distance to x is the smallest so
  far and pull it back, x_{k+1} = x + beta (x_{k+1} - x), beta = 0.9.

A point counts as broken when its best adversarial point lies within eps. FAB keeps
shrinking the distance after the first success; for the robust/non-robust verdict that
does not matter, so with the active set on, a point leaves the batch once it has an
adversarial point within eps (checked every `compact_every` iterations). The iteration
updates its state in place, so on a GPU it is captured in a CUDA graph and replayed
(`cuda_graph=`); there a compaction waits until a quarter of the rows can leave.
"""
from __future__ import annotations

import math

import torch

from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .graphs import StepLoop, want_cuda_graph

__all__ = ["FAB", "project_linf_box", "projection_for", "PROJECTIONS"]


def project_linf_box(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimal L-inf step onto a hyperplane inside the unit box, batched.

    For each row: the d minimizing ||d||_inf subject to <w, t + d> = b and
    0 <= t + d <= 1; if the box cannot reach the hyperplane, the step that gets closest
    (every coordinate moved to the box bound that moves <w, .> toward b).

    t, w: (M, D); b: (M,). Returns d: (M, D); coordinates with w = 0 do not move.

    With the orientation chosen so that <w, t> >= b, coordinate i moves by
    -sign(w_i) * min(lam, p_i), where p_i is its room to the box bound in that direction;
    <w, d(lam)> = -sum_i |w_i| min(lam, p_i) is piecewise linear and decreasing in lam, so
    lam solves one linear equation on the interval between two sorted p values, found by
    binary search over the sorted p.
    """
    m, dim = w.shape
    w = w.clone()
    b = b.clone()
    flip = torch.where((w * t).sum(1) - b >= 0, 1, -1).to(w.dtype)
    w.mul_(flip[:, None])
    b.mul_(flip)
    toward_one = (w < 0).to(w.dtype)                 # moving up lowers <w, .>
    moves = (w != 0).to(w.dtype)
    d_full = (toward_one - t) * moves                # every coordinate to its bound
    room = toward_one - t * (2 * toward_one - 1)     # p_i = |bound - t_i|
    order = torch.argsort(room, dim=1)               # ascending room
    need = b - (w * t).sum(1)                        # required change of <w, .>, <= 0
    reach = (w * d_full).sum(1)                      # change with every coordinate moved

    desc = order.flip((1,))                          # descending room
    w_desc = w.gather(1, desc)
    cum_w = torch.cumsum(w_desc.abs(), dim=1)        # sum of |w| over the j+1 largest rooms
    # change contributed by fully moving every coordinate outside the j+1 largest rooms
    cum_rest = torch.cumsum(-w_desc * d_full.gather(1, desc), dim=1) + reach[:, None]

    # <w, d(lam)> at lam = smallest room: every coordinate moves by lam
    at_min = cum_rest[:, -1] - cum_w[:, -1] * room.gather(1, order[:, :1]).squeeze(1)
    small = need - at_min > 0                        # lam below every room
    mid = (need - reach > 0) & ~small                # lam between two rooms

    # binary search, on every row (rows outside `mid` are discarded below)
    lb = torch.zeros(m, device=w.device, dtype=w.dtype)
    ub = torch.full_like(lb, dim - 1)
    for _ in range(math.ceil(math.log2(dim))):
        j = torch.floor((lb + ub) / 2)
        jl = j.long()[:, None]
        room_j = room.gather(1, order.gather(1, dim - 1 - jl))
        val = (cum_rest.gather(1, jl) - cum_w.gather(1, jl) * room_j).squeeze(1)
        go_right = need - val > 0
        lb = torch.where(go_right, j, lb)
        ub = torch.where(go_right, ub, j)
    lbl = lb.long()[:, None]

    lam_small = torch.clamp_min((need - cum_rest[:, -1]) / (-cum_w[:, -1]), 0)[:, None]
    d_small = (2 * toward_one - 1) * lam_small
    lam_mid = torch.clamp_min((need - cum_rest.gather(1, lbl).squeeze(1)) /
                              (-cum_w.gather(1, lbl).squeeze(1)), 0)[:, None]
    d_mid = (torch.min(lam_mid, d_full) * toward_one
             + torch.max(-lam_mid, d_full) * (1 - toward_one))
    d = torch.where(small[:, None], d_small, torch.where(mid[:, None], d_mid, d_full))
    return d * moves


PROJECTIONS = ("auto", "torch", "cpp")


def _has_cpp_projection() -> bool:
    from .. import ops
    return ops.extension is not None and hasattr(torch.ops.guard_fast_C, "fab_project")


def projection_for(request: str, device: torch.device) -> str:
    """Which projection FAB runs: "cpp" (the C++ CPU kernel guard_fast_C::fab_project,
    csrc/fab_cpu.cpp: per row, a sort-free solve of the same piecewise-linear equation,
    ~4x the torch form on a 2-core CPU; equal up to rounding) or "torch"
    (`project_linf_box`, fra31's arithmetic, and what CUDA tensors run, inside the
    attack's CUDA graph). "auto": cpp for CPU tensors when the extension has it."""
    if request not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(map(repr, PROJECTIONS))}; "
                         f"got {request!r}")
    if request == "torch" or (request == "auto" and (device.type != "cpu"
                                                      or not _has_cpp_projection())):
        return "torch"
    if device.type != "cpu":
        raise ValueError(f"projection='cpp' runs CPU tensors only; these are on {device}")
    if not _has_cpp_projection():
        raise RuntimeError("projection='cpp' needs guard_fast._C with fab_project: rebuild it "
                           "(pip install --no-build-isolation -e .)")
    return "cpp"


@register_attack("fab-t", "fab", "fabt")
class FAB(Attack):
    """FAB-T (Croce & Hein 2020), L-inf, multi-targeted.

    Args:
        eps: L-inf radius that decides success (and scales the random restarts).
        steps: iterations per target class (100 in AutoAttack standard, 10 in torchattacks).
        n_target_classes: number of target classes (9 in both AutoAttacks; torchattacks
            uses n_classes - 1); capped at n_classes - 1.
        n_restarts: restarts per target (restarts after the first start at random).
        alpha_max, eta, beta: the paper's constants (0.1, 1.05, 0.9).
        target_chunk: how many target classes run side by side in one batch (None: all).
            With one restart FAB draws no random numbers and each (point, target) run is
            independent, so running targets side by side and keeping, for each point, the
            first target in order that succeeds gives the reference's result with far
            fewer, larger batches. 1 runs the targets one after the other, as the reference
            code does. With n_restarts > 1 targets always run one after the other (the
            random restarts then draw from one stream in the reference order).
        compact_every: active-set compaction interval (one host sync each).
        projection: "auto" (default), "cpp" or "torch": which implementation of the L-inf
            projection runs (see `projection_for`); "torch" with conv_backward="pytorch"
            reproduces the reference's points bit for bit on the CPU.
    """

    name = "FAB-T"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, n_target_classes: int = 9,
                 n_restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, target_chunk=None, compact_every: int = 5,
                 projection: str = "auto", **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.steps = check_steps(steps)
        self.n_target_classes = check_steps(n_target_classes, "n_target_classes")
        self.n_restarts = check_steps(n_restarts, "n_restarts")
        self.alpha_max = check_positive(alpha_max, "alpha_max")
        self.eta = check_positive(eta, "eta")
        self.beta = check_positive(beta, "beta")
        self.target_chunk = None if target_chunk is None else check_steps(target_chunk,
                                                                          "target_chunk")
        self.compact_every = check_steps(compact_every, "compact_every")
        projection_for(projection, torch.device("cpu"))   # validates the name
        self.projection = projection

    #: with a captured step, compact only when at least this share of the rows can leave
    #: (each compaction costs a new capture); the eager loop compacts whenever any can
    graph_compact_share = 0.25
    #: steps of the last call that ran from a captured CUDA graph
    replayed_steps: int = 0

    #: per-row image copies besides activations: the iterate, best point, original, gradient
    #: and the projection's work on twice the rows (t, w, bounds, room, int64 sort order)
    state_copies = 24

    def per_sample_bytes(self, x, y) -> int:
        """A point is one row per target class running side by side."""
        rows = 1 if self.n_restarts > 1 else (self.target_chunk or self.n_target_classes)
        return super().per_sample_bytes(x, y) * rows

    def _diff_and_grad(self, x1, la, la_t):
        """f = Z_t - Z_y at x1 and its input gradient (per point: gradient of the sum)."""
        x1 = x1.clone().requires_grad_(True)
        with torch.enable_grad():
            z = self.get_logits(x1)
            f = z.gather(1, la_t[:, None]).squeeze(1) - z.gather(1, la[:, None]).squeeze(1)
            grad = self.input_grad(f.sum(), x1)
        return f.detach(), grad

    @torch.no_grad()
    def _single_run(self, x, y, target_rank, use_rand_start, g, group=None):
        """FAB-T on rows x toward, per row, the `target_rank`-th most likely class (a (M,)
        tensor). Returns (adv, dist): adv is x where no adversarial point was found (dist
        inf there). Rows r and r' with r % group == r' % group are the same point with
        different targets: with the active set, all leave once one is within eps."""
        logits = self.get_logits(x)
        correct = logits.argmax(1) == y
        adv_c = x.clone()
        dist_c = torch.full((x.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        keep = correct.nonzero().squeeze(1)
        if keep.numel() == 0:
            return adv_c, dist_c
        order = logits.sort(dim=-1)[1]
        la_target = order.gather(1, (logits.shape[1] - target_rank)[:, None]).squeeze(1)
        im2, la2, lt2 = x[keep], y[keep], la_target[keep]
        n = im2.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        adv = im2.clone()
        res2 = torch.full((n,), 1e10, device=x.device, dtype=x.dtype)
        x1 = im2.clone()
        if use_rand_start:
            t = (2 * torch.rand(x1.shape, generator=g) - 1).to(x.device, x.dtype)
            rad = torch.clamp(res2, max=self.eps).view(view)
            x1 = (im2 + rad * t / t.reshape(n, -1).abs().max(dim=1, keepdim=True)[0].view(view)
                  * 0.5).clamp(0.0, 1.0)
        out_adv, out_res = adv.clone(), res2.clone()
        project = (torch.ops.guard_fast_C.fab_project
                   if projection_for(self.projection, x.device) == "cpp" else project_linf_box)
        st = dict(x1=x1.contiguous(), im2=im2, la2=la2, lt2=lt2, adv=adv, res2=res2,
                  idx=torch.arange(n, device=x.device))   # idx: row of `keep` of each row

        def step() -> None:
            """One FAB iteration on the state tensors, in place."""
            x1, im2 = st["x1"], st["im2"]
            n = x1.shape[0]
            f, grad = self._diff_and_grad(x1, st["la2"], st["lt2"])
            w = grad.reshape(n, -1)
            b = -f + (w * x1.reshape(n, -1)).sum(dim=-1)
            d3 = project(torch.cat((x1.reshape(n, -1), im2.reshape(n, -1)), 0),
                                  torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1 = d3[:n].reshape(x1.shape)
            d2 = d3[n:].reshape(x1.shape)
            a0 = d3.abs().max(dim=1, keepdim=True)[0].view(view).clamp_min(1e-8)
            a1, a2 = a0[:n], a0[n:]
            alpha = torch.clamp(torch.clamp(a1 / (a1 + a2), min=0.0), max=self.alpha_max)
            x_new = ((x1 + self.eta * d1) * (1 - alpha) + (im2 + d2 * self.eta) * alpha).clamp(0.0, 1.0)

            is_adv = self.get_logits(x_new).argmax(1) != st["la2"]
            dist = (x_new - im2).reshape(n, -1).abs().max(dim=1)[0]
            better = is_adv & (dist < st["res2"])
            st["adv"].copy_(torch.where(better.view(view), x_new, st["adv"]))
            st["res2"].copy_(torch.where(better, dist, st["res2"]))
            x1.copy_(torch.where(is_adv.view(view), im2 + (x_new - im2) * self.beta, x_new))

        graph = want_cuda_graph(self.cuda_graph, x.device, self.steps)
        loop = StepLoop(step, graph, name=self.name)
        every = self.compact_every if self.active_set else self.steps
        done_steps = 0
        while done_steps < self.steps and n > 0:
            todo = min(every, self.steps - done_steps)
            loop.run(todo)
            done_steps += todo
            if not self.active_set or done_steps >= self.steps:
                continue
            done = st["res2"] <= self.eps
            if group is not None:        # a point is done when any of its targets is
                point = keep[st["idx"]] % group
                hit = torch.zeros(group, dtype=torch.bool, device=x.device)
                hit[point[done]] = True
                done = hit[point]
            n_done = int(done.sum())
            if n_done == 0 or (graph and n_done < self.graph_compact_share * n):
                continue
            dn = done.nonzero().squeeze(1)
            out_adv.index_copy_(0, st["idx"][dn], st["adv"][dn])
            out_res.index_copy_(0, st["idx"][dn], st["res2"][dn])
            kp = (~done).nonzero().squeeze(1)
            st = {k: t[kp] for k, t in st.items()}
            n = kp.numel()
            loop.reset()
        self.replayed_steps += loop.replayed
        if n > 0:
            out_adv.index_copy_(0, st["idx"], st["adv"])
            out_res.index_copy_(0, st["idx"], st["res2"])
        succ = out_res < 1e10
        adv_c[keep] = torch.where(succ.view(view), out_adv, x[keep])
        dist_c[keep] = torch.where(succ, out_res, dist_c[keep])
        return adv_c, dist_c

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone()
        self.replayed_steps = 0
        with torch.no_grad():
            logits = self.get_logits(x)
        robust = logits.argmax(1) == y
        last = min(self.n_target_classes, logits.shape[1] - 1)
        ranks = list(range(2, last + 2))
        g = self.cpu_generator()
        chunk = 1 if self.n_restarts > 1 else (self.target_chunk or len(ranks))
        for start in range(0, len(ranks), chunk):
            group = ranks[start:start + chunk]
            for restart in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                m, t = idx.numel(), len(group)
                # row k * m + j: point idx[j], target rank group[k]
                x_f = x[idx].repeat(t, *([1] * (x.dim() - 1)))
                y_f = y[idx].repeat(t)
                rank = torch.tensor(group, device=x.device).repeat_interleave(m)
                adv_curr, _ = self._single_run(x_f, y_f, rank, restart > 0, g,
                                               group=m if t > 1 else None)
                with torch.no_grad():
                    still = self.get_logits(adv_curr).argmax(1) == y_f
                res = (x_f - adv_curr).reshape(x_f.shape[0], -1).abs().max(dim=1)[0]
                ok = ~(still | (res > self.eps))
                ok_t = ok.view(t, m)
                fooled = ok_t.any(0)
                first = ok_t.to(torch.int8).argmax(0)       # first target, in order, that works
                chosen = adv_curr.view(t, m, *x.shape[1:])[first, torch.arange(m, device=x.device)]
                robust[idx[fooled]] = False
                adv[idx[fooled]] = chosen[fooled]
        return adv
