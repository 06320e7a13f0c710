"""The meta-test protocol of the paper: fixed held-out tasks, metrics after each inner step.

References:
    Finn, Abbeel & Levine (2017), §5: accuracies (and MSEs) averaged over 600 test tasks, with
    95% confidence intervals; Appendix Table 2 reports the sinusoid MSE after 1, 5, 10 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from maml_runner.maml import TaskLoss, adaptation_curve
from maml_runner.maml.functional import Params
from maml_runner.tasks import FixedTasks


@dataclass
class EvalResult:
    """Per metric (``query_loss``, ``query_acc``), mean and 95% CI after 0..S inner steps."""

    inner_steps: list[int]
    num_tasks: int
    mean: dict[str, list[float]]
    ci95: dict[str, list[float]]

    def at(self, metric: str, step: int) -> tuple[float, float]:
        return self.mean[metric][step], self.ci95[metric][step]

    def to_dict(self) -> dict:
        out: dict = {"inner_steps": self.inner_steps, "num_tasks": self.num_tasks}
        for metric in self.mean:
            out[metric] = {"mean": self.mean[metric], "ci95": self.ci95[metric]}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        metrics = [k for k, v in data.items() if isinstance(v, dict) and "mean" in v]
        return cls(
            inner_steps=list(data["inner_steps"]),
            num_tasks=int(data["num_tasks"]),
            mean={m: list(data[m]["mean"]) for m in metrics},
            ci95={m: list(data[m]["ci95"]) for m in metrics},
        )


# Student's t, 97.5% quantile, for 1..30 degrees of freedom (a 95% CI from few samples).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179]
_T975 += [2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064]
_T975 += [2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci95(values: torch.Tensor, *, few: bool = False) -> tuple[list[float], list[float]]:
    """Mean and 1.96·σ/√n over the last dim (tasks); σ with Bessel's correction.

    ``few=True`` (a handful of seeds, not 600 tasks) uses Student's t quantile instead of 1.96
    for n ≤ 31 (t = 4.30 for 3 seeds); one value has no interval (NaN).
    """
    n = values.shape[-1]
    values = values.double()
    mean = values.mean(-1)
    std = values.std(-1, correction=1) if n > 1 else torch.zeros_like(mean)
    z = 1.96
    if few:
        z = _T975[n - 2] if 1 < n <= len(_T975) + 1 else (math.nan if n == 1 else 1.96)
    return mean.tolist(), (z * std / math.sqrt(n)).tolist()


def meta_test(
    model: nn.Module,
    task_loss: TaskLoss,
    params: Params,
    tasks: FixedTasks,
    *,
    lr: float,
    steps: int,
) -> EvalResult:
    """Adapt θ to every task of ``tasks`` for ``steps`` steps; summarise each step's metrics."""
    chunks = [
        adaptation_curve(model, task_loss, params, batch, lr=lr, steps=steps)
        for batch in tasks.batches()
    ]
    mean, ci95 = {}, {}
    for name in chunks[0]:
        values = torch.cat([c[name] for c in chunks], dim=1)  # [steps+1, num_tasks]
        mean[f"query_{name}"], ci95[f"query_{name}"] = mean_ci95(values)
    return EvalResult(list(range(steps + 1)), tasks.num_tasks, mean, ci95)
