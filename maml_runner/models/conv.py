"""The paper's 4-block convolutional network for few-shot image classification.

Each block is 3×3 conv → batch norm → ReLU, then either a stride-2 convolution (Omniglot) or
2×2 max-pooling (miniImageNet) halves the resolution; a linear head follows, on the spatial mean
(Omniglot, as the reference code) or the flattened map (miniImageNet). The normalisation can be
another (``norm``: group norm, layer norm, or none); with batch norm the model is built from the
batched layers alone (the fast engine), with the others it runs on the torch.func path.

References:
    Finn, Abbeel & Levine (2017), §5.2 and Appendix A.2 (after Vinyals et al., 2016).
    Wu & He (2018), Group Normalization (GroupNorm; ``norm_groups`` = 1 normalises like layer
    norm with a per-channel affine). Ba, Kiros & Hinton (2016), Layer Normalization.
"""

from __future__ import annotations

import math

from torch import nn

from maml_runner.errors import choose, positive_int, require

DOWNSAMPLE = ("stride", "max_pool")
HEADS = ("mean", "flatten")
NORMS = ("batch", "group", "layer", "none")


def check_norm(norm: str, norm_groups: int, widths: list[int]) -> None:
    """``norm`` one of ``NORMS``; for ``group``, ``norm_groups`` divides every width."""
    choose("norm", norm, NORMS)
    positive_int("norm_groups", norm_groups)
    if norm == "group":
        bad = [w for w in widths if w % norm_groups]
        require(
            not bad,
            "norm_groups",
            norm_groups,
            f"group norm needs a number of groups that divides every width ({bad[:1]} does not)",
        )


def norm_layer(norm: str, channels: int, size: int, norm_groups: int) -> nn.Module:
    """The normalisation after a conv layer with ``channels`` maps of ``size``×``size``.

    ``batch``: per-task batch statistics, no running averages (transductive, as the paper's
    code); ``group``: GroupNorm(norm_groups, channels); ``layer``: LayerNorm over C×H×W with an
    element-wise affine; ``none``: the identity.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if norm == "group":
        return nn.GroupNorm(norm_groups, channels)
    if norm == "layer":
        return nn.LayerNorm([channels, size, size])
    return nn.Identity()


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
        norm: ``batch`` (the paper's), ``group``, ``layer`` or ``none`` (``norm_layer``).
        norm_groups: channel groups of group norm (``norm=group`` only; divides ``filters``).

    Raises:
        InvalidArgument: a size that is not an integer >= 1, an unknown ``downsample``,
            ``head`` or ``norm``, ``norm_groups`` that does not divide ``filters``.

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
        norm: str = "batch",
        norm_groups: int = 4,
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
        check_norm(norm, norm_groups, [filters])
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            stride = 2 if downsample == "stride" else 1
            conv_size = math.ceil(size / 2) if downsample == "stride" else size
            layers += [
                nn.Conv2d(channels, filters, 3, stride=stride, padding=1),
                norm_layer(norm, filters, conv_size, norm_groups),
                nn.ReLU(),
            ]
            if downsample == "max_pool":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                size = conv_size
            channels = filters
        if head == "mean":
            layers.append(nn.AdaptiveAvgPool2d(1))
            features = filters
        else:
            features = filters * size * size
        layers += [nn.Flatten(), nn.Linear(features, num_classes)]
        super().__init__(*layers)
