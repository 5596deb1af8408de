"""APGD-CE and APGD-T (Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", ICML 2020). Norm: L-inf.

Auto-PGD as fra31/auto-attack implements it (torchattacks 3.5.1 carries an older copy
with the same algorithm):

* random start x + eps * t / max|t|, t ~ U(-1, 1) per pixel, clipped to [0, 1];
* step size 2 * eps per point; the iterate moves with momentum 0.75 (the first step
  has none): z = P(x_k + eta * sign(g)), x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}));
* checkpoints after p_1 = max(int(0.22 N), 1) iterations, then intervals shrinking by
  max(int(0.03 N), 1) down to max(int(0.06 N), 1); at a checkpoint a point halves its
  step size and restarts from its best point if the loss increased in at most
  rho = 0.75 of the steps since the last checkpoint, or if the step was not halved at the
  last checkpoint and the best loss has not improved since (the paper's condition 2);
* losses: cross-entropy (APGD-CE), DLR, and targeted DLR
  -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2) for APGD-T, run once per target class
  t = the 2nd..(n_target_classes + 1)th most likely class, on the points still robust.

Each point's trajectory depends only on its own loss and state, so points that are
already fooled leave the batch at checkpoints (active set). The state is updated in place,
so on a GPU the plain step between checkpoints is captured in a CUDA graph and replayed
(`cuda_graph=`; there a compaction waits until a quarter of the points can leave, since
each costs a new capture). Whether a point is fooled is
unchanged by this; only which fooling iterate is returned can differ (the reference
returns the last fooling iterate, the active set the last one before the point left).

``variant="torchattacks"`` reproduces torchattacks' floating-point order where it differs
from fra31's (random start eps * t / max|t| vs eps * (t / (max|t| + 1e-12)), targeted-DLR
denominator Z1 - Z3/2 - Z4/2 vs Z1 - (Z3 + Z4)/2).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..kernels.attack_steps import apgd_step_ref
from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .graphs import StepLoop, want_cuda_graph
from .pgd import fused_steps

__all__ = ["APGD", "APGDT", "dlr_loss", "dlr_loss_targeted"]

VARIANTS = ("fra31", "torchattacks")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR: -(Z_y - max_{i!=y} Z_i) / (Z_pi1 - Z_pi3 + 1e-12)."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1.0 - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor,
                      variant: str = "fra31") -> torch.Tensor:
    """Targeted DLR: -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2 + 1e-12)."""
    z_sorted = logits.sort(dim=1)[0]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, y_target[:, None]).squeeze(1)
    if variant == "torchattacks":
        den = z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12
    else:
        den = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
    return -(z_y - z_t) / den


@register_attack("apgd-ce", "apgd", "apgdce")
class APGD(Attack):
    """APGD (Croce & Hein 2020), L-inf, cross-entropy (or DLR) loss.

    Args:
        eps: L-inf radius.
        steps: iterations per restart (100 in AutoAttack standard, 10 in torchattacks).
        n_restarts: restarts, each on the points still robust.
        loss: "ce" or "dlr".
        rho: the oscillation threshold of the step-size rule (0.75).
        variant: "fra31" or "torchattacks" floating-point order (see module docstring).
    """

    name = "APGD-CE"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, n_restarts: int = 1,
                 loss: str = "ce", rho: float = 0.75, variant: str = "fra31", **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.steps = check_steps(steps)
        self.n_restarts = check_steps(n_restarts, "n_restarts")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        self.loss = loss
        self.rho = check_positive(rho, "rho")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant

    # ------------------------------------------------------------------ pieces
    def _loss_indiv(self, logits, y, y_target):
        if y_target is not None:
            return dlr_loss_targeted(logits, y, y_target, self.variant)
        if self.loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return dlr_loss(logits, y)

    def _grad(self, x_adv, y, y_target):
        x_adv.requires_grad_(True)
        logits = self.get_logits(x_adv)
        loss = self._loss_indiv(logits, y, y_target)
        grad = self.input_grad(loss.sum(), x_adv)   # sum: per-point gradients
        x_adv.requires_grad_(False)
        return grad, logits.detach(), loss.detach()

    def _random_start(self, x, g):
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        t = (2 * torch.rand(x.shape, generator=g) - 1).to(x.device, x.dtype)
        t_max = t.reshape(n, -1).abs().max(dim=1)[0].view(view)
        if self.variant == "torchattacks":
            ones = torch.ones((n,) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
            x_adv = x + self.eps * ones * t / t_max
        else:
            x_adv = x + self.eps * torch.ones_like(x) * (t / (t_max + 1e-12))
        return x_adv.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ one run
    def _checkpoints(self):
        """Iterations (1-based counts of steps done) after which the step-size rule runs."""
        n_iter = self.steps
        k = max(int(0.22 * n_iter), 1)
        n_iter_min = max(int(0.06 * n_iter), 1)
        size_decr = max(int(0.03 * n_iter), 1)
        out, done = [], 0
        while done + k <= n_iter:
            done += k
            out.append((done, k))
            k = max(k - size_decr, n_iter_min)
        return out

    def _single_run(self, x, y, y_target, g, group=None, x_start=None):
        """APGD on points x (all robust at the start). Returns (robust flags, adversarial
        iterates); a point's iterate is meaningful where its flag is False.

        The state lives in fixed tensors updated in place, so on a GPU the plain step
        between two checkpoints is captured once in a CUDA graph and replayed (graphs.py);
        the checkpoints themselves run eagerly. Rows r and r' with r % group == r' % group
        are one point with different targets (APGD-T with batched targets): with the
        active set, all of them leave once one is fooled. x_start: the random start, if the
        caller drew it."""
        n_iter = self.steps
        n = x.shape[0]
        view = (-1,) + (1,) * (x.dim() - 1)
        eps = self.eps
        graph = want_cuda_graph(self.cuda_graph, x.device, n_iter)
        # the step (fused, or its reference) derives the box [max(x - eps, 0), min(x + eps, 1)]
        # from x and eps itself
        update = _ops.direct.apgd_step if fused_steps(x.device) else apgd_step_ref

        out_adv = torch.empty_like(x)
        out_acc = torch.empty(n, dtype=torch.bool, device=x.device)
        x_adv = self._random_start(x, g) if x_start is None else x_start
        grad, logits, loss_indiv = self._grad(x_adv, y, y_target)
        st = dict(x=x, y=y, idx=torch.arange(n, device=x.device),
                  x_adv=x_adv, x_adv_old=x_adv.clone(), x_best_adv=x_adv.clone(),
                  x_best=x_adv.clone(), grad=grad, grad_best=grad.clone(),
                  acc=logits.argmax(1) == y, loss_best=loss_indiv.clone(),
                  loss_steps=torch.zeros(n_iter, n, device=x.device, dtype=x.dtype),
                  step_size=torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * eps,
                                       device=x.device, dtype=x.dtype),
                  reduced_last_check=torch.ones(n, dtype=torch.bool, device=x.device),
                  it=torch.zeros(1, dtype=torch.long, device=x.device))
        st["loss_best_last_check"] = st["loss_best"].clone()
        if y_target is not None:
            st["y_target"] = y_target

        def step(a: float = 0.75) -> None:
            """One APGD iteration, every state tensor updated in place."""
            x_new = update(st["x_adv"], st["x_adv_old"], st["grad"], st["step_size"], st["x"],
                           eps, a)
            st["x_adv_old"].copy_(st["x_adv"])
            st["x_adv"].copy_(x_new)
            gr, lg, loss = self._grad(st["x_adv"].detach(), st["y"], st.get("y_target"))
            pred = lg.argmax(1) == st["y"]
            st["acc"].logical_and_(pred)
            st["x_best_adv"].copy_(torch.where(pred.view(view), st["x_best_adv"], st["x_adv"]))
            st["loss_steps"].index_copy_(0, st["it"], loss[None])
            st["it"].add_(1)
            improved = loss > st["loss_best"]
            st["x_best"].copy_(torch.where(improved.view(view), st["x_adv"], st["x_best"]))
            st["grad_best"].copy_(torch.where(improved.view(view), gr, st["grad_best"]))
            st["loss_best"].copy_(torch.where(improved, loss, st["loss_best"]))
            st["grad"].copy_(gr)

        step(1.0)   # the first step has no momentum
        loop = StepLoop(step, graph, name=self.name)
        done = 1
        for end, k in self._checkpoints():
            loop.run(end - done)
            done = end
            i = end - 1
            # ---- checkpoint: step-size rule (conditions 1 and 2 of the paper)
            # count of increases over the last k steps; index i - j - 1 may be -1, which
            # reads the (still zero) last row, as in the reference code
            rows = torch.arange(i - k + 1, i + 1, device=x.device)
            ls = st["loss_steps"]
            incr = (ls[rows] > ls[(rows - 1) % n_iter]).sum(0)
            fl_osc = incr.to(x.dtype) <= k * self.rho
            fl_no_impr = ~st["reduced_last_check"] & (st["loss_best_last_check"] >= st["loss_best"])
            fl = fl_osc | fl_no_impr
            st["reduced_last_check"].copy_(fl)
            st["loss_best_last_check"].copy_(st["loss_best"])
            st["step_size"].copy_(torch.where(fl.view(view), st["step_size"] / 2.0,
                                              st["step_size"]))
            st["x_adv"].copy_(torch.where(fl.view(view), st["x_best"], st["x_adv"]))
            st["grad"].copy_(torch.where(fl.view(view), st["grad_best"], st["grad"]))
            if self.active_set and self._compact(st, out_adv, out_acc, group, graph):
                if st["acc"].numel() == 0:
                    self.replayed_steps += loop.replayed
                    return out_acc, out_adv
                loop.reset()   # the state tensors were replaced: capture again
        loop.run(n_iter - done)
        self.replayed_steps += loop.replayed
        out_adv.index_copy_(0, st["idx"], st["x_best_adv"])
        out_acc[st["idx"]] = st["acc"]
        return out_acc, out_adv

    #: with a captured step, compact only when at least this share of the points left (a
    #: compaction costs a new capture); the eager loop compacts whenever any point left
    graph_compact_share = 0.25

    @staticmethod
    def _compact(st, out_adv, out_acc, group, graph) -> bool:
        """Fooled points leave the state (one host sync). Returns whether it shrank."""
        done = ~st["acc"]
        if group is not None:   # a point is done when any of its target rows is fooled
            point = st["idx"] % group
            hit = torch.zeros(group, dtype=torch.bool, device=done.device)
            hit[point[done]] = True
            done = hit[point]
        n, n_done = done.shape[0], int(done.sum())
        if n_done == 0 or (graph and n_done < APGD.graph_compact_share * n):
            return False
        dn = done.nonzero().squeeze(1)
        out_adv.index_copy_(0, st["idx"][dn], st["x_best_adv"][dn])
        out_acc[st["idx"][dn]] = st["acc"][dn]
        kp = (~done).nonzero().squeeze(1)
        for key, t in st.items():
            if key == "it":
                continue
            st[key] = t[:, kp] if key == "loss_steps" else t[kp]
        return True

    # ------------------------------------------------------------------ perturb
    def _targets(self, n_classes):
        return [None]

    #: steps of the last call that ran from a captured CUDA graph
    replayed_steps: int = 0

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone()
        self.replayed_steps = 0
        with torch.no_grad():
            logits = self.get_logits(x)
        robust = logits.argmax(1) == y
        g = self.cpu_generator()
        targets = self._targets(logits.shape[1])
        if getattr(self, "batch_targets", False) and len(targets) > 1:
            return self._attack_batched(x, y, adv, robust, targets, g)
        for target_class in targets:
            for _ in range(self.n_restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                x_f, y_f = x[idx], y[idx]
                y_target = None
                if target_class is not None:
                    with torch.no_grad():
                        y_target = self.get_logits(x_f).sort(dim=1)[1][:, -target_class]
                acc_curr, adv_curr = self._single_run(x_f, y_f, y_target, g)
                fooled = ~acc_curr
                robust[idx[fooled]] = False
                adv[idx[fooled]] = adv_curr[fooled]
        return adv

    def _attack_batched(self, x, y, adv, robust, targets, g):
        """Every target class in one run: row k * m + j is point j with target targets[k].
        The random starts are drawn target after target from the one generator, each of
        the robust points' shape, so a target's rows start where the one-after-the-other
        order starts them as long as no earlier target fooled a point (later targets then
        see fewer points there, and draw different starts). A point is fooled when any of
        its targets fools it; its adversarial example is that of the first such target."""
        t = len(targets)
        for _ in range(self.n_restarts):
            idx = robust.nonzero().squeeze(1)
            m = idx.numel()
            if m == 0:
                break
            x_f, y_f = x[idx], y[idx]
            with torch.no_grad():
                order = self.get_logits(x_f).sort(dim=1)[1]
            y_target = torch.cat([order[:, -tc] for tc in targets])
            starts = torch.cat([self._random_start(x_f, g) for _ in targets])
            rep = (t,) + (1,) * (x.dim() - 1)
            acc_curr, adv_curr = self._single_run(x_f.repeat(rep), y_f.repeat(t), y_target, g,
                                                  group=m, x_start=starts)
            ok = (~acc_curr).view(t, m)
            fooled = ok.any(0)
            first = ok.to(torch.int8).argmax(0)
            chosen = adv_curr.view(t, m, *x.shape[1:])[first, torch.arange(m, device=x.device)]
            robust[idx[fooled]] = False
            adv[idx[fooled]] = chosen[fooled]
        return adv

@register_attack("apgd-t", "apgdt", "apgd-dlr-t")
class APGDT(APGD):
    """APGD-T (Croce & Hein 2020), L-inf, targeted DLR loss over the top
    `n_target_classes` non-true classes (9 in AutoAttack standard; torchattacks uses
    n_classes - 1). Needs at least 4 classes; with fewer than n_target_classes + 1
    classes, every other class is targeted once.

    batch_targets: run all target classes side by side in one batch of n_target_classes x
    the robust points (opt-in; the reference runs them one after the other on the points
    the earlier targets left). On a GPU one large batch is several times faster than nine
    small ones. A point counts as fooled when any target fools it, as in the reference;
    the random starts of a later target differ from the reference's where an earlier
    target fooled some points, so robust accuracy agrees within noise rather than point
    for point (see `_attack_batched`). Memory: n_target_classes times the rows.
    """

    name = "APGD-T"

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, n_restarts: int = 1,
                 n_target_classes: int = 9, rho: float = 0.75, variant: str = "fra31",
                 batch_targets: bool = False, **kwargs):
        super().__init__(model, eps=eps, steps=steps, n_restarts=n_restarts, loss="dlr",
                         rho=rho, variant=variant, **kwargs)
        self.n_target_classes = check_steps(n_target_classes, "n_target_classes")
        if not isinstance(batch_targets, bool):
            raise ValueError(f"batch_targets must be True or False, got {batch_targets!r}")
        self.batch_targets = batch_targets

    def per_sample_bytes(self, x, y) -> int:
        """With batched targets a point is n_target_classes rows of the batch."""
        per = super().per_sample_bytes(x, y)
        return per * self.n_target_classes if self.batch_targets else per

    def _targets(self, n_classes):
        if n_classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs >= 4 classes; the model has "
                             f"{n_classes}")
        last = min(self.n_target_classes, n_classes - 1)
        return list(range(2, last + 2))
