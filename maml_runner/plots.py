"""PNG figures for a run folder: error vs. inner steps, and example tasks (paper Fig. 2 style)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from maml_runner.evaluation import EvalResult  # noqa: E402
from maml_runner.tasks.batch import TaskBatch  # noqa: E402

LABELS = {"query_loss": "query loss (MSE for regression)", "query_acc": "query accuracy"}


def adaptation_curves(
    curves: dict[str, EvalResult],
    path: Path,
    *,
    metric: str = "query_loss",
    paper: dict[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    title: str | None = None,
) -> Path:
    """Metric vs. inner steps with 95% CI bands, one line per run; paper points as markers."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, result in curves.items():
        _band(ax, result.inner_steps, result.mean[metric], result.ci95[metric], label)
    for label, (steps, values) in (paper or {}).items():
        ax.plot(steps, values, ls="none", marker="x", ms=8, color="black", label=f"paper: {label}")
    lows = [v for r in curves.values() for v in r.mean[metric] if math.isfinite(v) and v > 0]
    if metric == "query_loss" and lows and max(lows) > 20 * min(lows):
        ax.set_yscale("log")  # one diverging run must not flatten the others
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("inner gradient steps at meta-test")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title or "adaptation on held-out tasks (mean ± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _band(ax, x: Sequence[float], mean: Sequence[float], ci: Sequence[float], label: str) -> None:
    """A line of means with its ± CI band (none where the CI is NaN: one seed)."""
    mean_t, ci_t = torch.tensor(mean), torch.nan_to_num(torch.tensor(ci))
    (line,) = ax.plot(x, mean_t, marker="o", ms=3, label=label)
    ax.fill_between(x, mean_t - ci_t, mean_t + ci_t, alpha=0.2, color=line.get_color())


def _save(fig, path: Path, dpi: int = 120) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def wall_clock_curves(
    timed: Sequence, path: Path, *, budget: float, ylabel: str, scale: float = 1.0
) -> Path:
    """Validation metric (× ``scale``) vs. training time, one line per setting (``results.Timed``:
    mean over seeds, 95% CI band); a dotted line at ``budget``, the time every setting reached."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in timed:
        means, cis = [scale * m for m in t.means], [scale * c for c in t.cis]
        _band(ax, t.times, means, cis, f"{t.label} (seeds {t.seeds})")
    ax.axvline(budget, ls=":", color="gray", label=f"equal time: {budget:.0f} s")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title("validation during meta-training (mean over seeds ± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def regression_tasks(
    batch: TaskBatch,
    grid: torch.Tensor,
    truth: torch.Tensor,
    predictions: dict[int, torch.Tensor],
    path: Path,
) -> Path:
    """Each task: the true function, its K support points, the prediction after each step count.

    ``grid`` is ``[T, G, 1]``, ``truth`` the true values there and ``predictions[s]`` the
    model's after ``s`` inner steps (see ``maml.predictions_after``).
    """
    num = batch.num_tasks
    fig, axes = plt.subplots(1, num, figsize=(3.2 * num, 3), squeeze=False)
    x, support_x, support_y = grid.cpu(), batch.support_x.cpu(), batch.support_y.cpu()
    for t, ax in enumerate(axes[0]):
        ax.plot(x[t, :, 0], truth[t, :, 0].cpu(), color="black", lw=2, label="true function")
        for target, pred in predictions.items():
            style = "--" if target == 0 else "-"
            ax.plot(x[t, :, 0], pred[t, :, 0], ls=style, label=f"after {target} steps")
        ax.scatter(
            support_x[t, :, 0],
            support_y[t, :, 0],
            color="red",
            zorder=5,
            label=f"K={support_x.shape[1]} support points",
        )
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, dpi=110)


def nav_trajectories(episodes: Sequence, goals: torch.Tensor, path: Path, num_tasks: int) -> Path:
    """2D navigation paths before and after adaptation, one panel per task (paper Fig. 4 style).

    ``episodes[s]`` are the episodes sampled after ``s`` policy-gradient steps (``rl.Episodes``);
    each panel draws the first trajectory of each step and the task's goal.
    """
    num_tasks = min(num_tasks, goals.shape[0])
    fig, axes = plt.subplots(1, num_tasks, figsize=(3 * num_tasks, 3.2), squeeze=False)
    shown = sorted({0, 1, len(episodes) - 1} & set(range(len(episodes))))
    for t, ax in enumerate(axes[0]):
        for s in shown:
            ep = episodes[s]
            alive = int(ep.mask[t, 0].sum())
            xy = torch.cat([torch.zeros(1, 2), ep.obs[t, 0, :alive]], dim=0)
            label = "pre-update" if s == 0 else f"{s} step" + ("s" if s > 1 else "")
            ax.plot(xy[:, 0], xy[:, 1], lw=1.2, label=label)
        ax.plot(*goals[t].tolist(), marker="*", ms=12, color="black", label="goal")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(f"task {t}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("2D navigation: one trajectory per adaptation step")
    return _save(fig, path)
