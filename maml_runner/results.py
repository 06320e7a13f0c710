"""Run and sweep folders → tidy tables, the paper's numbers beside ours."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maml_runner.evaluation import EvalResult

METRICS = "metrics.json"


@dataclass
class Run:
    folder: Path
    metrics: dict

    @property
    def label(self) -> str:
        m = self.metrics
        name = m.get("experiment") or f"{m['task']} {m['algorithm']}"
        return f"{name} (seed {m['seed']})"

    @property
    def result(self) -> EvalResult:
        return EvalResult.from_dict(self.metrics["meta_test"])


def collect(paths: list[Path]) -> list[Run]:
    """Every finished run (a folder holding metrics.json) under ``paths``, sorted by folder."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob(METRICS)))
    return [Run(f.parent, json.loads(f.read_text())) for f in files]


def _steps(runs: list[Run]) -> list[int]:
    for run in runs:
        if run.metrics.get("paper"):
            return list(run.metrics["paper"]["steps"])
    longest = max(len(r.result.inner_steps) for r in runs)
    return [s for s in (0, 1, 5, 10) if s < longest]


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.2g}"


def markdown_table(runs: list[Run], metric: str = "query_loss") -> str:
    """One row per run: metric (mean ± 95% CI) after each reported step, and the paper's value."""
    steps = _steps(runs)
    head = ["run", "K (test)", "meta-iterations", "train time"]
    head += [f"{metric} @{s} (ours)" for s in steps] + [f"@{s} (paper)" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        m, result = run.metrics, run.result
        paper = m.get("paper") or {}
        paper_values = dict(zip(paper.get("steps", []), paper.get("mean", [])))
        cells = [
            run.label,
            str(m.get("eval_k_shot", "")),
            str(m["train"]["steps"]),
            f"{m['train']['train_time_s']:.0f} s",
        ]
        for s in steps:
            if metric in result.mean and s < len(result.inner_steps):
                mean, ci = result.at(metric, s)
                cells.append(f"{_number(mean)} ± {_number(ci)}")
            else:
                cells.append("")
        cells += [f"{paper_values[s]:.2f}" if s in paper_values else "" for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({r.metrics.get("hardware", {}).get("device", "?") for r in runs})
    lines.append("")
    lines.append(
        f"Hardware: {', '.join(devices)}. CI: 1.96·σ/√n over {runs[0].result.num_tasks} test tasks."
    )
    return "\n".join(lines)


def plot_runs(runs: list[Run], path: Path, metric: str = "query_loss") -> Path:
    from maml_runner.plots import adaptation_curves

    curves = {run.label: run.result for run in runs}
    paper = {}
    for run in runs:
        p = run.metrics.get("paper")
        if p and p.get("metric") == metric:
            paper[p.get("source", run.label)] = (p["steps"], p["mean"])
    return adaptation_curves(curves, path, metric=metric, paper=paper)
