"""A network as a function of one flat parameter vector, for trajectory matching.

MTT's expert trajectories store each epoch's parameters as one vector, and its student is
unrolled as w_{i+1} = w_i - lr * grad_w l(f(w_i, x_i)): the network is called with a flat
vector w that carries autograd history. :class:`FlatNet` does that with
``torch.func.functional_call`` on views of w (no module re-registration, as the public
code's ReparamModule does), so the same nn.Module serves every step and every w.
Buffers (BatchNorm statistics) are not part of w: trajectories match parameters only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["FlatNet"]


class FlatNet:
    """net's parameters as slices of one flat vector, in net.named_parameters() order."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in net.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def flatten(self) -> Tensor:
        """The net's current parameters as one detached vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def load(self, w: Tensor) -> None:
        """Copy w into the net's parameters."""
        self._check(w)
        with torch.no_grad():
            for p, v in zip(self.net.parameters(), torch.split(w, self.sizes)):
                p.copy_(v.view_as(p))

    def _check(self, w: Tensor) -> None:
        if w.dim() != 1 or w.numel() != self.numel:
            raise ValueError(f"this network has {self.numel} parameters; got a vector of shape "
                             f"{tuple(w.shape)}")

    def __call__(self, w: Tensor, x: Tensor) -> Tensor:
        """net(x) with its parameters taken from w (differentiable in w and x)."""
        self._check(w)
        params = {n: v.view(s) for n, v, s in zip(self.names, torch.split(w, self.sizes),
                                                  self.shapes)}
        return torch.func.functional_call(self.net, params, (x,))
