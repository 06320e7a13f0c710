"""MAML (Finn, Abbeel & Levine, ICML 2017) and its pretraining baseline, functionally.

Parameters are a dict of tensors. A meta-batch of T tasks is computed together: every weight gets
a leading task dimension (``[T, *shape]``) and the model's engine runs all tasks together (one
batched kernel per layer, or ``torch.func.vmap`` for any other module; ``engine.py``), so no
Python loop over tasks sits on the hot path.

References:
    Finn, Abbeel & Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks, ICML, arXiv:1703.03400. Algorithm 2 (supervised MAML) is ``MAML.outer_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maml_runner.errors import positive_int, require
from maml_runner.maml.engine import engine_for
from maml_runner.maml.functional import Params
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss


def adapt(
    model: nn.Module,
    task_loss: TaskLoss,
    params: Params,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    create_graph: bool,
) -> Params:
    """Take ``steps`` gradient steps of size ``lr`` on each task's ``(x, y)``; return θ'ᵢ per task.

    ``params`` are per task (``[T, *shape]``; ``per_task(θ, T)`` broadcasts shared ones);
    ``create_graph`` selects second-order (True) or first-order MAML. The model's engine (the
    batched layers or the torch.func path, ``engine.engine_for``) takes each step.
    """
    engine = engine_for(model)
    for _ in range(steps):
        params = engine.step(task_loss, params, x, y, lr, create_graph)
    return params


def check_inner(inner_lr: float, inner_steps: int) -> None:
    """Refuse a negative step size or a step count that is not an integer >= 0."""
    require(inner_lr >= 0, "inner_lr", inner_lr, "the inner step size must be >= 0")
    positive_int("inner_steps", inner_steps, minimum=0)


def per_task(params: Params, num_tasks: int) -> Params:
    """View shared weights θ as ``[T, *shape]`` without copying; their gradients are per task."""
    return {n: p.unsqueeze(0).expand(num_tasks, *p.shape) for n, p in params.items()}


class MAML:
    """Model-Agnostic Meta-Learning: the outer loss is the query loss after inner adaptation.

    Args:
        model: any ``nn.Module`` (batched layers, else the torch.func path: ``engine.py``).
        task_loss: the per-task loss (and metrics) for inner and outer objectives.
        inner_lr: α, the inner step size.
        inner_steps: gradient steps on the support set during meta-training.
        first_order: drop the second-order term (FOMAML, paper §5.2).

    Raises:
        InvalidArgument: ``inner_lr`` < 0 or ``inner_steps`` not an integer >= 0.
    """

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
    ) -> None:
        check_inner(inner_lr, inner_steps)
        self.model, self.task_loss = model, task_loss
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the query loss of θ'ᵢ = adapt(θ, support of task i)."""
        fast = adapt(
            self.model,
            self.task_loss,
            per_task(params, batch.num_tasks),
            batch.support_x,
            batch.support_y,
            lr=self.inner_lr,
            steps=self.inner_steps,
            create_graph=not self.first_order,
        )
        pred = engine_for(self.model).forward(fast, batch.query_x)
        return self.task_loss.loss(pred, batch.query_y).mean()


class Pretrain:
    """The paper's baseline: one model trained on all tasks' points jointly, no inner loop.

    At meta-test it is fine-tuned exactly like MAML (same steps, same α), which is the paper's
    "pretrained" row in the sinusoid comparison.
    """

    def __init__(self, model: nn.Module, task_loss: TaskLoss) -> None:
        self.model, self.task_loss = model, task_loss

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        shared = per_task(params, batch.num_tasks)
        return self.task_loss.loss(engine_for(self.model).forward(shared, x), y).mean()


def fine_tune(
    model: nn.Module, task_loss: TaskLoss, fast: Params, batch: TaskBatch, lr: float, steps: int
) -> Params:
    """``steps`` plain (first-order) gradient steps of size ``lr`` on each task's support set,
    as at meta-test; ``fast`` are per-task weights, returned detached."""
    with torch.enable_grad():
        fast = {n: w.detach().requires_grad_() for n, w in fast.items()}
        fast = adapt(
            model,
            task_loss,
            fast,
            batch.support_x,
            batch.support_y,
            lr=lr,
            steps=steps,
            create_graph=False,
        )
    return {n: w.detach() for n, w in fast.items()}


@torch.no_grad()
def adaptation_curve(
    model: nn.Module,
    task_loss: TaskLoss,
    params: Params,
    batch: TaskBatch,
    *,
    lr: float,
    steps: int,
) -> dict[str, Tensor]:
    """Query loss (and metrics) of each task after 0..steps inner steps, ``{name: [steps+1, T]}``.

    Fine-tuning as at meta-test: plain gradient steps of size ``lr`` from θ on each support set.
    """
    fast = per_task({n: p.detach() for n, p in params.items()}, batch.num_tasks)
    rows: dict[str, list[Tensor]] = {"loss": []}
    rows.update({name: [] for name in task_loss.metrics})
    for step in range(steps + 1):
        pred = engine_for(model).forward(fast, batch.query_x)
        rows["loss"].append(task_loss.loss(pred, batch.query_y))
        for name, fn in task_loss.metrics.items():
            rows[name].append(fn(pred, batch.query_y))
        if step < steps:
            fast = fine_tune(model, task_loss, fast, batch, lr, 1)
    return {name: torch.stack(values) for name, values in rows.items()}


@torch.no_grad()
def predictions_after(
    model: nn.Module,
    task_loss: TaskLoss,
    params: Params,
    batch: TaskBatch,
    x: Tensor,
    *,
    lr: float,
    steps: Sequence[int],
) -> dict[int, Tensor]:
    """Each task's predictions at ``x`` ``[T, G, ...]`` after each of ``steps`` inner steps (CPU).

    Fine-tuning as at meta-test, from θ on each task's support set; for plots.
    """
    fast = per_task({n: p.detach() for n, p in params.items()}, batch.num_tasks)
    predictions, done = {}, 0
    for target in sorted(steps):
        fast = fine_tune(model, task_loss, fast, batch, lr, target - done)
        done = target
        predictions[target] = engine_for(model).forward(fast, x).cpu()
    return predictions
