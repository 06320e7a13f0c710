"""The MAML core: functional adaptation and the meta-objective."""

from maml_runner.maml.core import MAML, Pretrain, TaskBatch, adapt, adaptation_curve, per_task
from maml_runner.maml.functional import batched_forward
from maml_runner.maml.losses import TaskLoss, classification_loss, regression_loss

__all__ = [
    "MAML",
    "Pretrain",
    "TaskBatch",
    "TaskLoss",
    "adapt",
    "adaptation_curve",
    "batched_forward",
    "per_task",
    "classification_loss",
    "regression_loss",
]
