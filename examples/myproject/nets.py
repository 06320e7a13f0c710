"""A residual conv net of one's own, meta-trained by `maml-run model=custom` (README: Your own
model). Any nn.Module works; maml-runner passes the task's input_shape and num_outputs."""

import torch
from torch import nn


class ResBlock(nn.Module):
    """Two 3x3 convs with group norm, and the input added back: x + f(x)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class ResConvNet(nn.Module):
    """A stride-2 stem, then [residual block, 2x2 max-pool] x blocks, a linear head on the mean."""

    def __init__(self, input_shape, num_outputs, channels=32, blocks=2):
        super().__init__()
        self.stem = nn.Conv2d(input_shape[0], channels, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels) for _ in range(blocks))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels, num_outputs)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = self.pool(block(h))
        return self.head(h.mean((-2, -1)))
