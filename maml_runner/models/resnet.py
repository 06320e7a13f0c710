"""ResNet-12, the backbone of much few-shot work after MAML (MetaOptNet, TADAM, SNAIL).

Four residual blocks, each three 3×3 conv layers (no bias) with a normalisation, LeakyReLU
(slope 0.1) after the first two, a 1×1 conv + normalisation shortcut added before the third's
LeakyReLU, then 2×2 max-pooling; widths 64-160-320-640 (84×84 → 42 → 21 → 10 → 5). A linear
head on the spatial mean of the last map gives the N logits. A plain ``nn.Module`` with a
forward of its own (the residual addition), so it runs on the torch.func path.

Where this differs from MetaOptNet's code: it has no DropBlock (its blocks 3-4 use DropBlock of
size 5); ``dropout`` here is plain dropout after every block's pooling, off by default. Its
conv layers are He-initialised for LeakyReLU (fan-out), as MetaOptNet's.

References:
    Lee, Maji, Ravichandran & Soatto (2019), Meta-Learning with Differentiable Convex
    Optimization (MetaOptNet), §4 and its code's ``resnet12``; Oreshkin, Rodríguez & Lacoste
    (2018), TADAM; Mishra et al. (2018), SNAIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from maml_runner.errors import is_number, positive_int, require
from maml_runner.models.conv import check_norm, norm_layer

SLOPE = 0.1  # LeakyReLU's negative slope (MetaOptNet)


class ResidualBlock(nn.Module):
    """3 × [3×3 conv, norm] with LeakyReLU, plus a 1×1 conv + norm shortcut, then max-pool 2×2.

    Args:
        in_channels: channels of the input map.
        out_channels: channels of every conv layer in the block.
        size: height = width of the input map (the block keeps it until the pooling).
        norm: ``batch``, ``group``, ``layer`` or ``none`` (``conv.norm_layer``).
        norm_groups: channel groups of group norm.
        dropout: dropout probability after the pooling (0: none).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: int,
        norm: str,
        norm_groups: int,
        dropout: float,
    ) -> None:
        super().__init__()
        bias = norm == "none"  # a normalisation's shift is the conv's bias otherwise
        widths = [in_channels, out_channels, out_channels, out_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
            for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.norms = nn.ModuleList(
            norm_layer(norm, out_channels, size, norm_groups) for _ in range(3)
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=bias),
            norm_layer(norm, out_channels, size, norm_groups),
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = norm(conv(h))
            if i < 2:
                h = F.leaky_relu(h, SLOPE)
        h = F.leaky_relu(h + self.shortcut(x), SLOPE)
        return self.dropout(self.pool(h))


class ResNet12(nn.Module):
    """``len(widths)`` residual blocks → spatial mean → linear head (``ResidualBlock``).

    Args:
        in_channels: image channels (3 for miniImageNet, 1 for Omniglot).
        image_size: input height = width; halved (floor) by each block, must stay >= 1.
        num_classes: N, the ways of a task.
        widths: channels of each block (MetaOptNet: ``[64, 160, 320, 640]``).
        norm: ``batch`` (per-task batch statistics, as the paper's conv4), ``group``, ``layer``
            or ``none``.
        norm_groups: channel groups of group norm (``norm=group`` only; divides every width).
        dropout: dropout probability after every block, in [0, 1).

    Raises:
        InvalidArgument: a size or width that is not an integer >= 1, an image too small for
            the blocks, an unknown ``norm``, ``norm_groups`` not dividing a width, ``dropout``
            outside [0, 1).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        widths: Sequence[int] = (64, 160, 320, 640),
        norm: str = "batch",
        norm_groups: int = 4,
        dropout: float = 0.0,
    ) -> None:
        for name, value in (
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("num_classes", num_classes),
        ):
            positive_int(name, value)
        widths = list(widths)
        ok = bool(widths) and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
        )
        require(ok, "widths", widths, "a list of integers >= 1, one per block")
        require(
            image_size >> len(widths) >= 1,
            "image_size",
            image_size,
            f"{len(widths)} blocks halve it {len(widths)} times: give >= {2 ** len(widths)}",
        )
        check_norm(norm, norm_groups, widths)
        number = is_number(dropout)
        require(number and 0 <= dropout < 1, "dropout", dropout, "a probability in [0, 1)")
        super().__init__()
        blocks, channels, size = [], in_channels, image_size
        for width in widths:
            blocks.append(ResidualBlock(channels, width, size, norm, norm_groups, dropout))
            channels, size = width, size // 2
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean((-2, -1)))
