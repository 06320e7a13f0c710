"""The RL job: MAML-TRPO on an environment family, and the paper's RL meta-test.

The meta-test (§5.3, Tables 4 and 5): from θ, sample ``eval_k_shot`` episodes of each test
task, take a policy-gradient step, sample again, ... and report the mean return (± 95% CI over
the test tasks) after 0..eval_steps steps; beside it, the same from the randomly initialised
policy θ₀.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from maml_runner import plots
from maml_runner.evaluation import EvalResult
from maml_runner.job import Job, Tested
from maml_runner.maml.functional import Params
from maml_runner.rl.envs import VectorEnv
from maml_runner.rl.meta import AdaptationResult, MetaRL
from maml_runner.tasks.base import make_generator
from maml_runner.trainer import Validation

RANDOM_INIT = "random_init"  # the baseline row: the policy before meta-training


@dataclass(kw_only=True)
class RLJob(Job):
    """An RL run: the environments, the learner, θ₀, and the validation and test goals."""

    env: VectorEnv
    learner: MetaRL
    initial_state: dict[str, Tensor]  # θ₀ (before meta-training): the random-init baseline
    val_tasks: Tensor
    test_tasks: Tensor
    inner_lr: float  # α at validation and meta-test
    eval_k_shot: int  # episodes per task and step at validation and meta-test
    eval_steps: int
    later_lr_scale: float  # at meta-test, steps after the first use α times this
    val_seed: int
    test_seed: int
    validate_every: bool  # validation on (trainer.val_every > 0)
    plot_tasks: int

    def __post_init__(self) -> None:
        if self.validate_every and self.validation is None:
            self.validation = Validation(self._validate, "meta_val/return_step1", maximize=True)

    def adaptation(self, params: Params, tasks: Tensor, steps: int, seed: int) -> AdaptationResult:
        """Returns of ``tasks`` after 0..steps policy-gradient steps from ``params`` (seeded)."""
        return self.learner.adaptation(
            params,
            tasks,
            steps=steps,
            lr=self.inner_lr,
            later_lr_scale=self.later_lr_scale,
            generator=make_generator(seed, torch.device("cpu")),
            episodes_per_task=self.eval_k_shot,
        )

    def _validate(self) -> dict[str, float]:
        adapted = self.adaptation(self.learner.params, self.val_tasks, 1, self.val_seed)
        return {"meta_val/return_step1": adapted.returns[-1].mean().item()}

    def _test(self, params: Params) -> tuple[EvalResult, AdaptationResult]:
        adapted = self.adaptation(params, self.test_tasks, self.eval_steps, self.test_seed)
        return EvalResult.of({"return": adapted.returns}), adapted

    def meta_test(self, baselines: bool = True) -> Tested:
        """Mean return after 0..eval_steps steps, and the random-init row (``baselines``)."""
        result, ours = self._test(self.learner.params)
        others = {RANDOM_INIT: self._test(self.initial_state)[0]} if baselines else {}
        return Tested(result, baselines=others, detail=ours)

    def plots(self, tested: Tested, folder: Path) -> dict[str, Path]:
        curves = {self.report.label: tested.result}
        if RANDOM_INIT in tested.baselines:
            curves["random init"] = tested.baselines[RANDOM_INIT]
        images = {
            "plots/adaptation": plots.adaptation_curves(
                curves,
                folder / "adaptation.png",
                metric="return",
                paper=self.report.paper_curve("return"),
                title=f"{self.report.header['task']}: return after policy-gradient steps "
                "(mean ± 95% CI)",
            )
        }
        if self.env.draws_trajectories and self.plot_tasks:
            images["plots/trajectories"] = plots.nav_trajectories(
                tested.detail.episodes,
                self.test_tasks,
                folder / "trajectories.png",
                self.plot_tasks,
            )
        return images

    def close(self) -> None:
        self.env.close()
