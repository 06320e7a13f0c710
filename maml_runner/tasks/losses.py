"""Per-task losses and metrics: every function maps ``[T, N, ...]`` predictions to ``[T]``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

PerTask = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each task, ``[T]``."""
    return (pred - target).square().flatten(1).mean(1)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of each task, ``[T]``; ``logits`` ``[T, N, C]``, ``target`` ``[T, N]``."""
    t, n = target.shape
    return (
        F.cross_entropy(logits.reshape(t * n, -1), target.reshape(-1), reduction="none")
        .view(t, n)
        .mean(1)
    )


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct predictions of each task, ``[T]``."""
    return (logits.argmax(-1) == target).float().mean(1)


@dataclass(frozen=True)
class TaskLoss:
    """The loss that adaptation and the meta-objective minimise, plus metrics to report.

    ``metrics`` maps a quantity name (``acc``) to a per-task function; it is reported as
    ``<split>/query_<name>`` beside ``<split>/query_loss``. ``select`` names the quantity that
    picks the best validation step and is the objective of sweeps (``loss`` or a metric), and
    ``maximize`` its direction.
    """

    loss: PerTask
    metrics: dict[str, PerTask] = field(default_factory=dict)
    select: str = "loss"
    maximize: bool = False


def regression_loss() -> TaskLoss:
    return TaskLoss(loss=mse)


def classification_loss() -> TaskLoss:
    return TaskLoss(loss=cross_entropy, metrics={"acc": accuracy}, select="acc", maximize=True)
