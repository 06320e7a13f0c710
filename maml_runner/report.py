"""What a finished run prints and writes: the console table, metrics.json, the W&B summary, plots.

One path for every kind of run: ``finish`` takes the job (its report settings and plots), the
meta-test and the training outcome.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from maml_runner.data.archives import atomic_file, os_reason, warn
from maml_runner.errors import UserError
from maml_runner.evaluation import EvalResult
from maml_runner.job import Job, Selection, Tested
from maml_runner.results import is_percent, paper_cell
from maml_runner.trainer import FitResult

METRICS = "metrics.json"
# How the console names each baseline row of a meta-test.
BASELINE_NAMES = {"random_init": "random initialisation"}

console = Console()


def print_result(tested: Tested, report_steps: list[int], paper: dict | None) -> None:
    """The meta-test table (mean ± 95% CI at ``report_steps``), the paper's column, baselines."""
    result = tested.result
    table = Table(title=f"meta-test on {result.num_tasks} held-out tasks (mean ± 95% CI)")
    table.add_column("inner steps", justify="right")
    metrics = list(result.mean)
    for metric in metrics:
        table.add_column(metric, justify="right")
    if paper:
        unit = " (%)" if is_percent(paper["metric"]) else ""
        table.add_column(f"paper {paper['metric']}{unit}", justify="right")
    for step in report_steps:
        row = [str(step)] + [
            f"{result.mean[m][step]:.4f} ± {result.ci95[m][step]:.4f}" for m in metrics
        ]
        if paper:
            row.append(paper_cell(paper, step))  # as the paper prints it: 98.7 ± 0.4
        table.add_row(*row)
    console.print(table)
    if any(result.diverged):
        worst = max(result.diverged)
        medians = "; ".join(
            f"{m} " + ", ".join(f"{result.median[m][s]:.4g}" for s in report_steps) for m in metrics
        )
        console.print(
            f"[yellow]warning:[/] {worst} of {result.num_tasks} tasks diverged (non-finite "
            f"figures) at some inner step; the means include them. Medians at steps "
            f"{report_steps}: {medians}"
        )
    for name, baseline in tested.baselines.items():
        for metric, values in baseline.mean.items():
            shown = ", ".join(f"{v:.2f}" for v in values)
            last = len(baseline.inner_steps) - 1
            console.print(
                f"{BASELINE_NAMES.get(name, name)}, {metric} after 0..{last} steps: {shown}"
            )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def metrics(job: Job, tested: Tested, fitted: FitResult, selected: Selection) -> dict:
    """The contents of ``metrics.json``."""
    objective = selected.objective if math.isfinite(selected.objective) else None
    out = {
        **job.report.header,
        # the tested θ first; the result ends with each test task's figures (see EvalResult)
        "meta_test": {
            "checkpoint": selected.checkpoint,
            "step": selected.step,
            **tested.result.to_dict(),
        },
        "meta_val": {"best": fitted.best},
        "train": {
            "steps": fitted.step,
            "train_time_s": fitted.train_time,
            "it_per_s": fitted.it_per_s,
        },
        "hardware": {"device": device_name(job.device), "torch": torch.__version__},
        "paper": job.report.paper,
        "objective": objective,
        "objective_metric": selected.metric,
    }
    if tested.baselines:
        out["baselines"] = {name: r.to_dict() for name, r in tested.baselines.items()}
    return out


def summarise(tracker, result: EvalResult, step: int) -> None:
    """The final meta-test figures to the history and the W&B summary (every step, ± CI)."""
    summary = {}
    for metric in result.mean:
        for s in result.inner_steps:
            summary[f"meta_test/{metric}_step{s}"] = result.mean[metric][s]
            summary[f"meta_test/{metric}_ci95_step{s}"] = result.ci95[metric][s]
    tracker.log({f"meta_test/{m}": result.mean[m][-1] for m in result.mean}, step)
    tracker.summary(summary)


def describe(selected: Selection) -> str:
    """One line: which θ was tested and what the sweepers are told."""
    if selected.metric is None:
        return f"meta-tested θ of step {selected.step} (no validation ran: sweep objective NaN)"
    return (
        f"meta-tested θ of step {selected.step} ({selected.checkpoint} {selected.metric}); "
        f"sweep objective {selected.objective:.4g}"
    )


def finish(
    run_dir: Path, tracker, job: Job, tested: Tested, fitted: FitResult, selected: Selection
) -> None:
    """Print the table; write metrics.json, the W&B summary and the plots; say where they are."""
    print_result(tested, job.report.report_steps, job.report.paper)
    console.print(describe(selected))
    data = metrics(job, tested, fitted, selected)
    try:  # the results first: a plot that cannot be written must not cost them
        with atomic_file(run_dir / METRICS) as f:  # a killed run leaves no half-written file
            f.write(json.dumps(data, indent=2).encode())
    except OSError as err:
        raise UserError(
            f"{os_reason(err, run_dir)} while writing {run_dir / METRICS}; the table above is the "
            f"result and checkpoints/ holds θ: free some space, then maml-run evaluate {run_dir}"
        ) from None
    summarise(tracker, tested.result, fitted.step)
    try:
        images = job.plots(tested, run_dir)
    except OSError as err:
        warn(f"cannot write the plots to {run_dir} ({os_reason(err, run_dir)}); metrics.json is "
             f"written")  # fmt: skip
        images = {}
    tracker.log_images(images, fitted.step)
    console.print(f"run folder: {run_dir} (metrics.json, adaptation.png, checkpoints/)")
