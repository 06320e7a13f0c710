"""A Job: what one run needs, built from the config by ``build`` and run by ``app.run``.

Supervised and RL runs are the same protocol: the meta-parameters and their ``update(step)``
(a learner, a task stream and an update, in that order, made by ``build``), the cadence, the
validation (owned by the job: its function, metric key and direction), the meta-test (the
result, any baselines, the objective handed to sweepers), the plots it draws, and ``close()``
(a job is a context manager). Every setting is bound once at build time; nothing here reads a
config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from maml_runner import checkpoint, plots
from maml_runner.errors import UserError
from maml_runner.evaluation import EvalResult, ensemble_test, meta_test
from maml_runner.maml import predictions_after
from maml_runner.maml.functional import Params
from maml_runner.tasks import FixedTasks
from maml_runner.tasks.base import TaskFamily
from maml_runner.trainer import Cadence, FitResult, Update, Validation


@dataclass(frozen=True)
class Report:
    """What a finished run's report says beside its numbers.

    ``header`` opens ``metrics.json`` (experiment, task, algorithm, first_order, k_shot,
    eval_k_shot, seed); ``paper`` is the preset's ``paper:`` block (or None); ``report_steps``
    are the inner steps of the console table; ``label`` names our curve in plots.
    """

    header: dict[str, Any]
    paper: dict | None
    report_steps: list[int]
    label: str

    def paper_curve(self, metric: str) -> dict | None:
        """The paper's numbers as ``{label: (steps, values)}`` for a plot of ``metric``."""
        if not (self.paper and self.paper["metric"] == metric):
            return None
        return {self.label: (list(self.paper["steps"]), list(self.paper["mean"]))}


@dataclass
class Tested:
    """A meta-test: our result and any baselines (``{"random_init": ...}``).

    ``detail`` is what plots need beyond the numbers (RL: the test episodes).
    """

    result: EvalResult
    baselines: dict[str, EvalResult] = field(default_factory=dict)
    detail: Any = None


@dataclass(frozen=True)
class Selection:
    """Which θ the meta-test tests, and the objective a sweeper is told.

    ``objective`` is the validation figure of that θ as a value to minimise (negated where
    higher is better), never a test figure; NaN when no validation ran. ``metric`` names it.
    """

    checkpoint: str  # best | last
    step: int
    objective: float
    metric: str | None


@dataclass(kw_only=True)
class Job:
    """The part every job shares; ``SupervisedJob`` and ``rl.job.RLJob`` add the rest."""

    model: nn.Module  # holds θ (its state dict is what checkpoints save)
    params: Params  # θ by name: what the learner adapts from, the update moves
    optimizer: torch.optim.Optimizer | None  # state to checkpoint (TRPO keeps none)
    scheduler: LRScheduler | None = None  # outer.scheduler: stepped by ``update``, checkpointed
    learner: Any  # the algorithm's objective (``MAML``, ``Pretrain``, ``rl.meta.MetaRL``)
    stream: Any  # meta-training tasks: ``stream.batch(step)``
    update: Update  # one meta-step of ``learner`` on ``stream.batch(step)``
    metrics: tuple[str, ...]  # the names of what ``update`` returns
    stop: Any  # None, or torchrun's agreement on stopping (``DistributedStep.stop``)
    cadence: Cadence
    validation: Validation | None
    report: Report
    test_checkpoint: str  # best | last: the θ the meta-test uses when validation ran
    keep_best: int  # validation checkpoints kept (checkpoints/top/) for an ensemble meta-test
    resume: str | None  # run folder or checkpoint to continue from
    config: dict  # the resolved config: saved in checkpoints, logged to W&B
    device: torch.device
    num_threads: int | None  # torch's CPU threads for this run (None: torch's default)
    # the learner's own meta-parameters beside θ (Meta-SGD's α; empty for MAML): optimised with
    # θ, checkpointed as "learned" (``checkpoint.load_weights``)
    learned: nn.Module = field(default_factory=nn.Module)

    def meta_parameters(self) -> Params:
        """Everything meta-learned, by name: θ and ``learned.<name>`` (checked for NaN by the
        trainer, broadcast under torchrun)."""
        learned = {f"learned.{n}": p for n, p in self.learned.named_parameters()}
        return {**self.params, **learned}

    def select(self, fitted: FitResult, folder: Path) -> Selection:
        """Put the θ to meta-test into the model: the best validation step's (``best.pt``) or
        the last; say which, with the objective. Without validation: the last, objective NaN."""
        val, last = self.validation, fitted.last_validation
        if val is None or last is None:
            return Selection("last", fitted.step, math.nan, None)
        sign = -1.0 if val.maximize else 1.0
        best = fitted.best
        if self.test_checkpoint == "best" and best is not None:
            if best["step"] != fitted.step:
                path = folder / "checkpoints" / checkpoint.BEST
                self.load(checkpoint.load(path, self.device), str(path))
            return Selection("best", best["step"], sign * best["value"], val.key)
        return Selection("last", fitted.step, sign * last["value"], val.key)

    def load(self, state: dict, where: str) -> None:
        """Put a checkpoint's meta-parameters (θ and the learner's own) into the job, after
        checking them against the configured model and algorithm; ``where`` names the file."""
        checkpoint.load_weights(state, self.model, self.learned, where)

    def meta_test(self, baselines: bool = True) -> Tested:
        raise NotImplementedError

    def meta_test_ensemble(self, states: list[dict]) -> EvalResult:
        """The meta-test of the checkpoints ``states`` as one ensemble (averaged predictions)."""
        raise UserError(
            f"--ensemble: {type(self).__name__} runs have no ensemble meta-test "
            f"(it averages classifier or regressor predictions); leave --ensemble out"
        )

    def plots(self, tested: Tested, folder: Path) -> dict[str, Path]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the job holds (environments); called once, by ``__exit__``."""

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(kw_only=True)
class SupervisedJob(Job):
    """Regression and few-shot classification: MAML (or pretraining) on a task family."""

    family: TaskFamily  # the test split's family (its loss and task plot)
    val_tasks: FixedTasks | None
    test_tasks: FixedTasks
    eval_steps: int  # inner steps at validation and meta-test
    plot_tasks: int  # example tasks drawn when the family has a task plot

    def __post_init__(self) -> None:
        if self.val_tasks is not None and self.validation is None:
            loss = self.family.task_loss  # its quantity that picks the best step
            key = f"meta_val/query_{loss.select}"
            self.validation = Validation(self._validate, key, maximize=loss.maximize)

    def _evaluate(self, tasks: FixedTasks) -> EvalResult:
        return meta_test(self.learner, self.params, tasks, steps=self.eval_steps)

    def _validate(self) -> dict[str, float]:
        result = self._evaluate(self.val_tasks)
        return {f"meta_val/{m}": result.mean[m][-1] for m in result.mean}

    def meta_test(self, baselines: bool = True) -> Tested:
        """The paper's protocol on the test tasks (query metrics after 0..eval_steps steps)."""
        return Tested(self._evaluate(self.test_tasks))

    def meta_test_ensemble(self, states: list[dict]) -> EvalResult:
        """The test tasks' metrics of the members' averaged predictions (the MAML++ protocol);
        the model holds the last member's θ afterwards."""
        members = [functools.partial(self.load, state, "an ensemble member") for state in states]
        return ensemble_test(
            self.learner, self.params, self.test_tasks, members, steps=self.eval_steps
        )

    def plots(self, tested: Tested, folder: Path) -> dict[str, Path]:
        images = {
            "plots/adaptation": plots.adaptation_curves(
                {self.report.label: tested.result},
                folder / "adaptation.png",
                paper=self.report.paper_curve("query_loss"),
            )
        }
        task_plot = self.family.task_plot
        num = min(self.plot_tasks, tested.result.num_tasks)
        if num and task_plot is not None:
            tasks = self.test_tasks.first(num)
            grid = task_plot.grid.to(self.device).unsqueeze(0).expand(num, -1, -1)
            steps = sorted({0, 1, self.eval_steps})
            predictions = predictions_after(self.learner, self.params, tasks, grid, steps=steps)
            images["plots/tasks"] = plots.regression_tasks(
                tasks, grid, task_plot.truth(tasks.info, grid), predictions, folder / "tasks.png"
            )
        return images
