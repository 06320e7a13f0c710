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

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from maml_runner.errors import positive_int, require
from maml_runner.maml.engine import StepSize, engine_for, meta_training
from maml_runner.maml.functional import Params
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss

# A per-task predictor: inputs [T, N, ...] -> outputs [T, N, ...] with one task's weights each.
Predict = Callable[[Tensor], Tensor]


class Adapts(Protocol):
    """What the meta-test needs of a learner: its task loss and how it adapts at meta-test."""

    task_loss: TaskLoss
    learned: nn.Module  # the learner's own meta-parameters beside θ (``Learned``)

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """The per-task predictor after 0, 1, ..., ``steps`` adaptation steps from θ."""
        ...


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
    for s in range(steps):
        params = engine.step(task_loss, params, x, y, lr, create_graph, inner_step=s)
    return params


class Learned(nn.Module):
    """A learner's own meta-parameters beside θ, by dotted name (Meta-SGD's ``lr.0.weight``).

    An ``nn.Module`` so that the outer optimiser, ``.to(device)`` and checkpoints treat them as
    they treat θ; nested so that ``state_dict()`` keeps each name as given. Empty for MAML.
    """

    def __init__(self, tensors: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        for name, tensor in (tensors or {}).items():
            *path, leaf = name.split(".")
            module: nn.Module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, nn.Parameter(tensor))

    def group(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under ``prefix.``, by the rest of their name."""
        cut = len(prefix) + 1
        return {n[cut:]: p for n, p in self.named_parameters() if n.startswith(prefix + ".")}


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
        self.model, self.task_loss, self.learned = model, task_loss, Learned()
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the query loss of θ'ᵢ = adapt(θ, support of task i)."""
        with meta_training(self.model):
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
            pred = engine_for(self.model).forward(fast, batch.query_x, self.inner_steps)
        return self.task_loss.loss(pred, batch.query_y).mean()

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: plain gradient steps of size α (no graph kept)."""
        return sgd_adaptation(self.model, self.task_loss, params, batch, self.inner_lr, steps)


class Pretrain:
    """The paper's baseline: one model trained on all tasks' points jointly, no inner loop.

    At meta-test it is fine-tuned exactly like MAML (same steps, same α = ``inner_lr``), which
    is the paper's "pretrained" row in the sinusoid comparison.
    """

    def __init__(self, model: nn.Module, task_loss: TaskLoss, *, inner_lr: float) -> None:
        check_inner(inner_lr, 0)
        self.model, self.task_loss, self.inner_lr = model, task_loss, inner_lr
        self.learned = Learned()

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        shared = per_task(params, batch.num_tasks)
        return self.task_loss.loss(engine_for(self.model).forward(shared, x), y).mean()

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: fine-tuned like MAML, plain gradient steps of size α."""
        return sgd_adaptation(self.model, self.task_loss, params, batch, self.inner_lr, steps)


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


def sgd_adaptation(
    model: nn.Module, task_loss: TaskLoss, params: Params, batch: TaskBatch, lr: float, steps: int
) -> Iterator[Predict]:
    """Meta-test adaptation by plain gradient steps of size ``lr`` from θ on each support set:
    yields the per-task predictor after 0, 1, ..., ``steps`` steps (MAML's and pretraining's)."""
    return stepped_adaptation(model, task_loss, params, batch, steps, lambda step: lr)


def stepped_adaptation(
    model: nn.Module,
    task_loss: TaskLoss,
    params: Params,
    batch: TaskBatch,
    steps: int,
    step_size: Callable[[int], StepSize],
    weights_at: Callable[[Params, int], Params] | None = None,
) -> Iterator[Predict]:
    """Meta-test adaptation by first-order steps of ``step_size(s)`` (a ``StepSize``: a float,
    or by name a learned rate) from θ: the per-task predictor after 0, 1, ..., ``steps`` steps.

    ``weights_at(fast, s)``, when given, are the weights the forward uses at step s (MAML++'s
    per-step batch-norm weights); step s's support forward and the predictor after s + 1 steps
    use the same s, as in the authors' code. Per-step batch-norm statistics (BNRS) are those of
    the weights' own step: s for the support forward of step s and the predictor after s steps.
    """
    engine = engine_for(model)
    at = weights_at or (lambda fast, s: fast)
    fast = per_task({n: p.detach() for n, p in params.items()}, batch.num_tasks)
    for step in range(steps + 1):
        yield partial(engine.forward, at(fast, max(step - 1, 0)), inner_step=step)
        if step < steps:
            with torch.enable_grad():
                fast = {n: w.detach().requires_grad_() for n, w in at(fast, step).items()}
                fast = engine.step(
                    task_loss,
                    fast,
                    batch.support_x,
                    batch.support_y,
                    step_size(step),
                    False,
                    inner_step=step,
                )
            fast = {n: w.detach() for n, w in fast.items()}


@torch.no_grad()
def adaptation_curve(
    learner: Adapts, params: Params, batch: TaskBatch, *, steps: int
) -> dict[str, Tensor]:
    """Query loss (and metrics) of each task after 0..steps inner steps, ``{name: [steps+1, T]}``.

    The learner adapts as at meta-test (``learner.adaptation``); θ is left unchanged.
    """
    task_loss = learner.task_loss
    rows: dict[str, list[Tensor]] = {"loss": []}
    rows.update({name: [] for name in task_loss.metrics})
    for predict in learner.adaptation(params, batch, steps):
        pred = predict(batch.query_x)
        rows["loss"].append(task_loss.loss(pred, batch.query_y))
        for name, fn in task_loss.metrics.items():
            rows[name].append(fn(pred, batch.query_y))
    return {name: torch.stack(values) for name, values in rows.items()}


@torch.no_grad()
def predictions_after(
    learner: Adapts, params: Params, batch: TaskBatch, x: Tensor, *, steps: Sequence[int]
) -> dict[int, Tensor]:
    """Each task's predictions at ``x`` ``[T, G, ...]`` after each of ``steps`` inner steps (CPU).

    The learner adapts as at meta-test, from θ on each task's support set; for plots.
    """
    wanted = set(steps)
    predictions = {}
    for step, predict in enumerate(learner.adaptation(params, batch, max(wanted))):
        if step in wanted:
            predictions[step] = predict(x).cpu()
    return predictions
