"""Small modules of a user's own, for the torch.func path's tests and the config example."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ResidualMLP(nn.Module):
    """``x → Linear → [h + tanh(Linear(LayerNorm(h)))] × blocks → Linear``: a forward of its own.

    Args:
        input_shape: the task's input shape (``[1]`` for the sinusoid), from ``build``.
        num_outputs: the task's output size, from ``build``.
        width: hidden width.
        blocks: residual blocks.
        norm: ``layer`` (LayerNorm inside each block) or ``none``.
        dropout: dropout probability inside each block (0: none).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        width: int = 16,
        blocks: int = 2,
        norm: str = "layer",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.stem = nn.Linear(math.prod(input_shape), width)
        self.norms = nn.ModuleList(
            nn.LayerNorm(width) if norm == "layer" else nn.Identity() for _ in range(blocks)
        )
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x.flatten(1)))
        for norm, block in zip(self.norms, self.blocks, strict=True):
            h = h + self.dropout(torch.tanh(block(norm(h))))
        return self.head(h)


class NormConv(nn.Module):
    """Two 3×3 conv blocks with a chosen normalisation, mean-pooled, then a linear head.

    Args:
        norm: ``group`` (GroupNorm, 2 groups), ``layer`` (LayerNorm over C×H×W, plus dropout
            when ``dropout`` > 0) or ``batch`` (BatchNorm2d with running statistics).
    """

    def __init__(
        self, in_channels: int, size: int, classes: int, norm: str, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, s = in_channels, size
        for _ in range(2):
            layers.append(nn.Conv2d(channels, 4, 3, padding=1, stride=2))
            channels, s = 4, (s + 1) // 2
            if norm == "group":
                layers.append(nn.GroupNorm(2, 4))
            elif norm == "layer":
                layers.append(nn.LayerNorm([4, s, s]))
            else:
                layers.append(nn.BatchNorm2d(4))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x).mean((-2, -1))))


class SkipSequential(nn.Sequential):
    """A ``Sequential`` whose own forward adds a skip connection (the batched layers refuse it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)
