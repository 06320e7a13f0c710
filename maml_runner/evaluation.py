"""The meta-test protocol of the paper: fixed held-out tasks, metrics after each inner step.

References:
    Finn, Abbeel & Levine (2017), §5: accuracies (and MSEs) averaged over 600 test tasks, with
    95% confidence intervals; Appendix Table 2 reports the sinusoid MSE after 1, 5, 10 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from maml_runner.maml.core import Adapts, adaptation_curve
from maml_runner.maml.functional import Params
from maml_runner.tasks import FixedTasks


@dataclass
class EvalResult:
    """Per metric (``query_loss``, ``query_acc``), mean, 95% CI and median after 0..S steps,
    and each test task's own figure (``per_task[metric][s][i]``, the tasks in the meta-test's
    fixed order), so that a mean can be read back to the tasks behind it.

    ``diverged[s]`` counts the tasks whose figures are not finite after ``s`` steps (the mean
    then is not finite either; the median is over the tasks that have a number).
    """

    inner_steps: list[int]
    num_tasks: int
    mean: dict[str, list[float]]
    ci95: dict[str, list[float]]
    median: dict[str, list[float]] = field(default_factory=dict)
    diverged: list[int] = field(default_factory=list)
    per_task: dict[str, list[list[float]]] = field(default_factory=dict)

    @classmethod
    def of(cls, values: dict[str, torch.Tensor]) -> EvalResult:
        """Summarise ``{metric: [steps+1, tasks]}`` over the tasks."""
        mean, ci95, median, per_task = {}, {}, {}, {}
        for name, v in values.items():
            mean[name], ci95[name] = mean_ci95(v)
            median[name] = v.double().nanmedian(-1).values.tolist()
            per_task[name] = v.double().tolist()
        finite = torch.stack([torch.isfinite(v) for v in values.values()]).all(0)
        steps, num_tasks = finite.shape
        diverged = (~finite).sum(-1).tolist()
        return cls(list(range(steps)), num_tasks, mean, ci95, median, diverged, per_task)

    def at(self, metric: str, step: int) -> tuple[float, float]:
        return self.mean[metric][step], self.ci95[metric][step]

    def to_dict(self) -> dict:
        out: dict = {"inner_steps": self.inner_steps, "num_tasks": self.num_tasks}
        for metric in self.mean:
            out[metric] = {"mean": self.mean[metric], "ci95": self.ci95[metric]}
            if metric in self.median:
                out[metric]["median"] = self.median[metric]
        if self.diverged:
            out["diverged"] = self.diverged
        if self.per_task:  # last: thousands of numbers, after the figures a reader looks for
            out["per_task"] = self.per_task
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        metrics = [k for k, v in data.items() if isinstance(v, dict) and "mean" in v]
        return cls(
            inner_steps=list(data["inner_steps"]),
            num_tasks=int(data["num_tasks"]),
            mean={m: list(data[m]["mean"]) for m in metrics},
            ci95={m: list(data[m]["ci95"]) for m in metrics},
            median={m: list(data[m]["median"]) for m in metrics if "median" in data[m]},
            diverged=list(data.get("diverged", [])),
            per_task={m: list(v) for m, v in data.get("per_task", {}).items()},
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


def meta_test(learner: Adapts, params: Params, tasks: FixedTasks, *, steps: int) -> EvalResult:
    """Adapt θ to every task of ``tasks`` for ``steps`` steps as the learner does at meta-test;
    summarise each step's metrics."""
    chunks = [adaptation_curve(learner, params, batch, steps=steps) for batch in tasks.batches()]
    # [steps+1, num_tasks] per quantity, named as reported: query_loss, query_acc
    return EvalResult.of({f"query_{n}": torch.cat([c[n] for c in chunks], 1) for n in chunks[0]})


@torch.no_grad()
def ensemble_test(
    learner: Adapts,
    params: Params,
    tasks: FixedTasks,
    members: Sequence[Callable[[], None]],
    *,
    steps: int,
) -> EvalResult:
    """Meta-test an ensemble: each member (``load()`` puts its θ into ``params``) adapts to every
    task on its own, and the members' query predictions (logits, or regression outputs) are
    averaged at each inner step before the metrics are taken.

    References:
        Antoniou, Edwards & Storkey (2019), How to train your MAML, ICLR, arXiv:1810.09502,
        §4: the test predictions of the top-5 validation models are ensembled.
    """
    task_loss = learner.task_loss
    total: list[torch.Tensor] = []  # per chunk of tasks: [steps+1, T, Q, ...], summed over members
    rows: dict[str, list[torch.Tensor]] = {"loss": []}
    rows.update({name: [] for name in task_loss.metrics})
    for member, load in enumerate(members):
        load()
        last = member == len(members) - 1
        for i, batch in enumerate(tasks.batches()):  # image task sets are redrawn: once a member
            pred = torch.stack([p(batch.query_x) for p in learner.adaptation(params, batch, steps)])
            if i < len(total):
                total[i] += pred
            else:
                total.append(pred)
            if last:  # the metrics of the members' mean, while this chunk is at hand
                mean = total[i] / len(members)
                rows["loss"].append(torch.stack([task_loss.loss(m, batch.query_y) for m in mean]))
                for name, fn in task_loss.metrics.items():
                    rows[name].append(torch.stack([fn(m, batch.query_y) for m in mean]))
    return EvalResult.of({f"query_{n}": torch.cat(v, 1) for n, v in rows.items()})
