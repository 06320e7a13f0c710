"""The MAML core: functional adaptation and the meta-objective."""

from maml_runner.maml.core import (
    MAML,
    Pretrain,
    adapt,
    adaptation_curve,
    per_task,
    predictions_after,
)
from maml_runner.maml.functional import batched_forward
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss, classification_loss, regression_loss

__all__ = [
    "MAML",
    "Pretrain",
    "TaskBatch",
    "TaskLoss",
    "adapt",
    "adaptation_curve",
    "batched_forward",
    "per_task",
    "predictions_after",
    "classification_loss",
    "regression_loss",
]
