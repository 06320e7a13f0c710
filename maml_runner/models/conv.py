"""The paper's 4-block convolutional network for few-shot image classification.

Each block is 3×3 conv → batch norm → ReLU, then either a stride-2 convolution (Omniglot) or
2×2 max-pooling (miniImageNet) halves the resolution; a linear head follows, on the spatial mean
(Omniglot, as the reference code) or the flattened map (miniImageNet).

References:
    Finn, Abbeel & Levine (2017), §5.2 and Appendix A.2 (after Vinyals et al., 2016).
"""

from __future__ import annotations

import math

from torch import nn

from maml_runner.errors import choose, positive_int

DOWNSAMPLE = ("stride", "max_pool")
HEADS = ("mean", "flatten")


class Conv4(nn.Sequential):
    """``blocks`` × [conv 3×3, batch norm, ReLU (, max-pool)] → linear head.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        image_size: input height = width.
        num_classes: N, the ways of a task.
        filters: channels of every conv layer (64 Omniglot, 32 miniImageNet).
        blocks: number of conv blocks.
        downsample: ``stride`` (stride-2 convs) or ``max_pool`` (2×2 max-pooling).
        head: ``mean`` (average over space) or ``flatten`` before the linear layer.

    Raises:
        InvalidArgument: a size that is not an integer >= 1, an unknown ``downsample`` or
            ``head``.

    Batch norm keeps no running statistics: every task is normalised with its own batch
    statistics, in training and at test (transductive, as the paper's code).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        filters: int = 64,
        blocks: int = 4,
        downsample: str = "stride",
        head: str = "mean",
    ) -> None:
        for name, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("num_classes", num_classes),
            ("filters", filters),
            ("blocks", blocks),
        ):
            positive_int(name, value)
        choose("downsample", downsample, DOWNSAMPLE)
        choose("head", head, HEADS)
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            layers += [
                nn.Conv2d(channels, filters, 3, stride=stride, padding=1),
                nn.BatchNorm2d(filters, track_running_stats=False),
                nn.ReLU(),
            ]
            if downsample == "max_pool":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = math.ceil(size / 2)
            channels = filters
        if head == "mean":
            layers.append(nn.AdaptiveAvgPool2d(1))
            features = filters
        else:
            features = filters * size * size
        layers += [nn.Flatten(), nn.Linear(features, num_classes)]
        super().__init__(*layers)
