"""Small classifiers for the loss tests (CPU, float64 friendly)."""
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-BN-act-conv-BN-act-pool-linear; `act` picks a smooth (tanh) or ReLU network."""

    def __init__(self, c_in=3, classes=5, width=6, act="tanh"):
        super().__init__()
        a = nn.Tanh if act == "tanh" else nn.ReLU
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), a(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), a(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, classes))

    def forward(self, x):
        return self.body(x)


def make(dtype=torch.float64, act="tanh", seed=0, warm=True, **kw):
    torch.manual_seed(seed)
    m = SmallCNN(act=act, **kw).to(dtype)
    if warm:  # non-trivial running statistics, so eval and train BN differ
        m.train()
        with torch.no_grad():
            for _ in range(3):
                m(torch.rand(16, m.body[0].in_channels, 8, 8, dtype=dtype) * 2)
    return m
