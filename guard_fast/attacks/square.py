"""Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020). Norm: L-inf. Score-based: it
only queries logits, never gradients.

Algorithm (L-inf, as in fra31's SquareAttack and torchattacks 3.5.1's Square, which agree):
start from x + eps * s with one random sign per (channel, column) ("vertical stripes");
then for each query i pick a square side s_i = round(sqrt(p_i * H * W)) (p_i from the
piecewise-constant schedule of the paper, starting at p_init, halved at iterations 10, 50,
200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query budget), a random position, and
one random sign per channel; set that window to x_best + 2 * eps * sign, project onto the
eps-ball and [0, 1], and keep the candidate if it lowers the margin loss
Z_y - max_{i!=y} Z_i (or fools the model). With ``rescale_schedule=True`` (the class
default in both codes) the iteration index is rescaled to a 10000-query budget;
fra31's AutoAttack passes ``rescale_schedule=False``.

The candidate (a copy of x_best with one window moved) is one fused op,
guard_fast::square_window (Triton, C++ CPU, CUDA), unless the backend is "torch".

Only still-robust points are queried: a point leaves the batch once its margin is <= 0.
The window position, size and signs are shared by the whole batch at each iteration (as
in both reference codes), so the random stream does not depend on which points remain and
the active set does not change any result. Random numbers are drawn on the CPU from a
generator seeded with `seed` in the order both reference codes draw them after
torch.manual_seed(seed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..kernels.attack_steps import square_window_ref
from .base import Attack, check_eps, check_positive, check_steps, register_attack
from .graphs import StepLoop, want_cuda_graph
from .pgd import fused_steps

__all__ = ["Square", "square_p_selection"]

# iteration thresholds of the p schedule (for a 10000-query budget) and the divisor of p_init
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
               (6000, 128), (8000, 256))


def square_p_selection(it: int, p_init: float, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels the square covers at iteration `it` (paper's schedule)."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in _P_SCHEDULE:
        if it <= bound:
            return p_init / div
    return p_init / 512


@register_attack("square", "square-linf")
class Square(Attack):
    """Square attack (Andriushchenko et al. 2020), L-inf, margin (or CE) loss.

    Args:
        eps: L-inf radius.
        n_queries: query budget per restart.
        p_init: initial fraction of pixels changed.
        n_restarts: restarts (only on points still robust).
        loss: "margin" (default) or "ce".
        rescale_schedule: rescale the p schedule to `n_queries` (True in torchattacks'
            Square and fra31's SquareAttack by default; False inside fra31's AutoAttack).
        compact_every: with the active set, fooled points leave the batch every this many
            queries (each compaction is one host sync; in between they are queried but
            frozen, so the result is the same for any value). "auto": 1 on CPU, where a
            sync is free and a query is not, 10 on CUDA.
    """

    name = "Square"
    norm = "Linf"

    def __init__(self, model, eps: float = 8 / 255, n_queries: int = 5000, p_init: float = 0.8,
                 n_restarts: int = 1, loss: str = "margin", rescale_schedule: bool = True,
                 compact_every="auto", **kwargs):
        super().__init__(model, eps=check_eps(eps), **kwargs)
        self.n_queries = check_steps(n_queries, "n_queries")
        self.p_init = check_positive(p_init, "p_init")
        if self.p_init > 1:
            raise ValueError(f"p_init must lie in (0, 1], got {p_init!r}")
        self.n_restarts = check_steps(n_restarts, "n_restarts")
        if loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
        self.loss = loss
        self.rescale_schedule = bool(rescale_schedule)
        self.compact_every = compact_every if compact_every == "auto" else check_steps(
            compact_every, "compact_every")

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _margin_and_loss(self, x, y):
        logits = self.get_logits(x)
        y_corr = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).max(dim=1)[0]
        margin = y_corr - others
        if self.loss == "margin":
            return margin, margin
        return margin, -F.cross_entropy(logits, y, reduction="none")

    @staticmethod
    def _rand_sign(shape, g):
        return torch.sign(2 * torch.rand(shape, generator=g) - 1)

    @staticmethod
    def _rand_int(high: int, g) -> int:
        # torch.rand -> scale -> truncate, as both reference codes do (high itself excluded)
        return int((high * torch.rand([1], generator=g)).long())

    # ------------------------------------------------------------------ one run
    @torch.no_grad()
    def _single_run(self, x, y, g):
        """Square attack on points x (all initially robust). Returns x_best."""
        n, c, h, w = x.shape
        eps = self.eps
        n_features = c * h * w
        lo = (x - eps).clamp_(min=0.0)   # == clamp(min(max(., x-eps), x+eps), 0, 1) bounds
        hi = (x + eps).clamp_(max=1.0)
        x_best = torch.clamp(x + eps * self._rand_sign([n, c, 1, w], g).to(x.device, x.dtype),
                             0.0, 1.0)
        margin_min, loss_min = self._margin_and_loss(x_best, y)
        pre = self._windows(g, n_features, c, h, w, x.device, x.dtype)
        if pre is not None and want_cuda_graph(self.cuda_graph, x.device, self.n_queries):
            return self._table_loop(x_best, margin_min, loss_min, y, lo, hi, pre, graph=True)
        if not self.active_set:
            return self._loop_all(x_best, margin_min, loss_min, y, lo, hi, g, pre)
        # Active set: the state holds only points whose margin is still > 0; a point that
        # leaves is written to `out` and never queried again.
        out = x_best.clone()
        idx = torch.arange(n, device=x.device)
        state = (idx, x_best, margin_min, loss_min, y, lo, hi)
        state = self._compact(state, out)
        every = self._compact_every(x.device)
        for i_iter in range(self.n_queries):
            if state is None:
                break
            idx, xb, mm, lm, yy, lo_a, hi_a = state
            x_new = self._candidate(xb, lo_a, hi_a, i_iter, g, n_features, c, h, w, pre)
            margin, loss = self._margin_and_loss(x_new, yy)
            live = mm > 0           # points fooled since the last compaction stay frozen
            improved = (loss < lm) & live
            lm = torch.where(improved, loss, lm)
            improved |= (margin <= 0) & live
            mm = torch.where(improved, margin, mm)
            xb = torch.where(improved.view(-1, 1, 1, 1), x_new, xb)
            state = (idx, xb, mm, lm, yy, lo_a, hi_a)
            if (i_iter + 1) % every == 0 or i_iter + 1 == self.n_queries:
                state = self._compact(state, out)
        if state is not None:
            out.index_copy_(0, state[0], state[1])
        return out

    #: with a captured query, compact only when at least this share of the points left
    #: (each compaction costs a new capture)
    graph_compact_share = 0.25
    #: queries of the last call that ran from a captured CUDA graph
    replayed_steps: int = 0

    def _table_loop(self, x_best, margin_min, loss_min, y, lo, hi, pre, graph):
        """The query loop with every random draw in device tables and the query index in a
        device counter, so one query is a fixed sequence of kernels with no host values:
        on a GPU it is captured in a CUDA graph and replayed (graphs.py). The candidate is
        where(window mask, clamp(x_best + step * sign_c, lo, hi), x_best), the same values
        as the fused window op. With the active set, finished points stay frozen and leave
        every `compact_every` queries once a quarter of them can (a new capture each)."""
        n, c, h, w = x_best.shape
        wins = torch.tensor(pre[0], dtype=torch.long, device=x_best.device)   # (Q, 3): s, vh, vw
        delta = (2.0 * self.eps) * pre[1]                                     # (Q, C)
        rows = torch.arange(h, device=x_best.device).view(h, 1)
        cols = torch.arange(w, device=x_best.device).view(1, w)
        it = torch.zeros(1, dtype=torch.long, device=x_best.device)
        out = x_best.clone()
        st = dict(idx=torch.arange(n, device=x_best.device), xb=x_best.clone(),
                  mm=margin_min.clone(), lm=loss_min.clone(), yy=y, lo=lo, hi=hi)

        def step() -> None:
            s_, vh, vw = wins.index_select(0, it).unbind(1)
            mask = ((rows >= vh) & (rows < vh + s_)) & ((cols >= vw) & (cols < vw + s_))
            xb = st["xb"]
            moved = torch.clamp(xb + delta.index_select(0, it).view(1, c, 1, 1), st["lo"], st["hi"])
            x_new = torch.where(mask, moved, xb)
            margin, loss = self._margin_and_loss(x_new, st["yy"])
            live = st["mm"] > 0
            improved = (loss < st["lm"]) & live
            st["lm"].copy_(torch.where(improved, loss, st["lm"]))
            improved = improved | ((margin <= 0) & live)
            st["mm"].copy_(torch.where(improved, margin, st["mm"]))
            xb.copy_(torch.where(improved.view(-1, 1, 1, 1), x_new, xb))
            it.add_(1)

        loop = StepLoop(step, graph, name=self.name)
        every = self._compact_every(x_best.device) if self.active_set else self.n_queries
        done = 0
        while done < self.n_queries:
            todo = min(every, self.n_queries - done)
            loop.run(todo)
            done += todo
            if not self.active_set or done == self.n_queries:
                continue
            n_cur = st["mm"].shape[0]
            n_left = n_cur - int((st["mm"] > 0).sum())
            if n_left == 0 or (graph and n_left < self.graph_compact_share * n_cur):
                continue
            state = self._compact(tuple(st[k] for k in ("idx", "xb", "mm", "lm", "yy", "lo", "hi")),
                                  out)
            if state is None:
                self.replayed_steps += loop.replayed
                return out
            st.update(zip(("idx", "xb", "mm", "lm", "yy", "lo", "hi"), state))
            loop.reset()
        self.replayed_steps += loop.replayed
        out.index_copy_(0, st["idx"], st["xb"])
        return out

    def _compact_every(self, device) -> int:
        if self.compact_every != "auto":
            return self.compact_every
        return 10 if torch.device(device).type == "cuda" else 1

    @staticmethod
    def _compact(state, out):
        """Drop points whose margin is <= 0 (one host sync); None when none is left."""
        idx, xb, mm = state[0], state[1], state[2]
        keep = mm > 0
        n_keep = int(keep.sum())
        if n_keep == keep.shape[0]:
            return state
        done = (~keep).nonzero().squeeze(1)
        out.index_copy_(0, idx[done], xb[done])
        if n_keep == 0:
            return None
        k = keep.nonzero().squeeze(1)
        return tuple(t[k] for t in state)

    def _window(self, i_iter, g, n_features, c, h, w):
        """Query i_iter's window: side s, position (vh, vw), one sign per channel (a CPU
        tensor), drawn from g in the reference order (position, then signs)."""
        p = square_p_selection(i_iter, self.p_init, self.n_queries, self.rescale_schedule)
        s = max(int(round(math.sqrt(p * n_features / c))), 1)
        s = min(s, h, w)
        vh = self._rand_int(h - s, g)
        vw = self._rand_int(w - s, g)
        return s, vh, vw, self._rand_sign([c, 1, 1], g)

    def _windows(self, g, n_features, c, h, w, device, dtype):
        """Every query's window drawn up front (the draws do not depend on the data): one
        copy of all signs to the device instead of one small copy per query. The CPU
        generator yields one 32-bit draw per float whatever the call's size, so one draw of
        n_queries x (2 + C) floats is the per-query sequence (position, position, C signs)
        and the arithmetic is `_window`'s. Only with one restart, where nothing draws from g
        after the queries (a run that ends early has drawn more than the reference, which no
        later draw can see)."""
        if self.n_restarts != 1:
            return None
        q = self.n_queries
        sizes = []
        for i in range(q):
            p = square_p_selection(i, self.p_init, q, self.rescale_schedule)
            sizes.append(min(max(int(round(math.sqrt(p * n_features / c))), 1), h, w))
        u = torch.rand(q * (2 + c), generator=g).view(q, 2 + c)
        side = torch.tensor(sizes, dtype=torch.long)
        vh = ((h - side).to(u.dtype) * u[:, 0]).long()
        vw = ((w - side).to(u.dtype) * u[:, 1]).long()
        signs = torch.sign(2 * u[:, 2:] - 1).to(device, dtype)
        return list(zip(sizes, vh.tolist(), vw.tolist())), signs

    def _candidate(self, xb, lo, hi, i_iter, g, n_features, c, h, w, pre=None):
        """x_best with one random square window moved to the other side of the eps-box."""
        if pre is not None:
            (s, vh, vw), signs = pre[0][i_iter], pre[1][i_iter]
        else:
            s, vh, vw, signs = self._window(i_iter, g, n_features, c, h, w)
            signs = signs.to(xb.device, xb.dtype)
        # Only the window changes: outside it x_best already lies inside [lo, hi]. The fused
        # op does the copy and the window update in one pass.
        candidate = _ops.direct.square_window if fused_steps(xb.device) else square_window_ref
        return candidate(xb, lo, hi, signs.reshape(c), vh, vw, s, 2.0 * self.eps)

    def _loop_all(self, x_best, margin_min, loss_min, y, lo, hi, g, pre=None):
        """Reference loop without the active set: every point is queried every iteration,
        finished points are frozen (no host syncs)."""
        n, c, h, w = x_best.shape
        for i_iter in range(self.n_queries):
            x_new = self._candidate(x_best, lo, hi, i_iter, g, c * h * w, c, h, w, pre)
            margin, loss = self._margin_and_loss(x_new, y)
            live = margin_min > 0
            improved = (loss < loss_min) & live
            loss_min = torch.where(improved, loss, loss_min)
            improved |= (margin <= 0) & live
            margin_min = torch.where(improved, margin, margin_min)
            x_best = torch.where(improved.view(-1, 1, 1, 1), x_new, x_best)
        return x_best

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Square needs images of shape (N, C, H, W), got {tuple(x.shape)}")
        adv = x.clone()
        self.replayed_steps = 0
        with torch.no_grad():
            robust = self.get_logits(x).argmax(1) == y
        g = self.cpu_generator()
        for _ in range(self.n_restarts):
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv_curr = self._single_run(x[idx], y[idx], g)
            with torch.no_grad():
                fooled = self.get_logits(adv_curr).argmax(1) != y[idx]
            robust[idx[fooled]] = False
            adv[idx[fooled]] = adv_curr[fooled]
        return adv
