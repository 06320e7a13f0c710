"""Run and sweep folders → tidy tables, the paper's numbers beside ours."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from maml_runner.evaluation import EvalResult, mean_ci95

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

    @property
    def overrides(self) -> list[str]:
        """The job's command-line overrides (Hydra's ``.hydra/overrides.yaml``), if it has them."""
        path = self.folder / ".hydra" / "overrides.yaml"
        return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


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


def table_metric(runs: list[Run]) -> str:
    """The metric a table of ``runs`` shows: the one their paper numbers use, else the first."""
    for run in runs:
        paper = run.metrics.get("paper")
        if paper and paper.get("metric") in run.result.mean:
            return paper["metric"]
    return next(iter(runs[0].result.mean))


def _with_baselines(runs: list[Run]) -> list[Run]:
    """RL runs also hold their random initialisation's curve: show it as a row of its own."""
    rows, seen = [], set()
    for run in runs:
        rows.append(run)
        for name, result in (run.metrics.get("baselines") or {}).items():
            # runs of one task and seed share their initialisation: show it once
            key = (run.metrics["task"], run.metrics["seed"], name, str(result))
            if key in seen:
                continue
            seen.add(key)
            m = {**run.metrics, "meta_test": result, "paper": None}
            m["experiment"] = f"{run.metrics['task']} {name.replace('_', ' ')}"
            m["train"] = {"steps": 0, "train_time_s": 0.0}
            rows.append(Run(run.folder, m))
    return rows


def markdown_table(runs: list[Run], metric: str | None = None) -> str:
    """One row per run: metric (mean ± 95% CI) after each reported step, and the paper's value.

    ``metric`` defaults to ``table_metric(runs)``; RL runs add a row for their random init.
    """
    metric = metric or table_metric(runs)
    runs = _with_baselines(runs)
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


def plot_runs(runs: list[Run], path: Path, metric: str | None = None) -> Path:
    from maml_runner.plots import adaptation_curves

    metric = metric or table_metric(runs)
    curves = {run.label: run.result for run in _with_baselines(runs)}
    paper = {}
    for run in runs:
        p = run.metrics.get("paper")
        if p and p.get("metric") == metric:
            paper[p.get("source", run.label)] = (p["steps"], p["mean"])
    return adaptation_curves(curves, path, metric=metric, paper=paper)


# Overrides that do not change what a run computes: they never split a setting.
NOT_A_SETTING = ("seed=", "launcher=", "hydra/", "logger", "trainer.progress=")


@dataclass
class Setting:
    """The runs of one setting of a sweep: the same overrides but ``seed``."""

    label: str
    runs: list[Run]


def by_setting(runs: list[Run]) -> list[Setting]:
    """Group runs by their overrides but ``seed=`` (and ``NOT_A_SETTING``); label by what varies.

    Runs without ``.hydra/overrides.yaml`` are grouped by experiment (or task and algorithm).
    """

    def key(run: Run) -> tuple[str, ...]:
        kept = tuple(sorted(o for o in run.overrides if not o.startswith(NOT_A_SETTING)))
        return kept or (run.label.rsplit(" (seed", 1)[0],)

    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    shared = set.intersection(*(set(k) for k in groups)) if len(groups) > 1 else set()
    settings = []
    for k, members in groups.items():
        label = " ".join(o for o in k if o not in shared) or " ".join(k) or "all runs"
        settings.append(Setting(label, sorted(members, key=lambda r: r.metrics["seed"])))
    return settings


def _over_seeds(values: list[float]) -> tuple[float, float]:
    return mean_ci95(torch.tensor(values), few=True)


def setting_rows(settings: list[Setting], metric: str = "query_loss") -> list[dict]:
    """Per setting: seeds, and mean ± 95% CI over seeds of the objective and ``metric`` by step."""
    steps = _steps([r for s in settings for r in s.runs])
    rows = []
    for setting in settings:
        runs = setting.runs
        row: dict = {
            "setting": setting.label,
            "seeds": " ".join(str(r.metrics["seed"]) for r in runs),
            "n_seeds": len(runs),
        }
        objective = [r.metrics.get("objective", r.result.mean[metric][-1]) for r in runs]
        row["objective_mean"], row["objective_ci95"] = _over_seeds(objective)
        for step in steps:
            values = [
                r.result.at(metric, step)[0] for r in runs if step < len(r.result.inner_steps)
            ]
            mean, ci = _over_seeds(values) if values else (math.nan, math.nan)
            row[f"{metric}_step{step}_mean"], row[f"{metric}_step{step}_ci95"] = mean, ci
        train = [r.metrics["train"] for r in runs]
        row["train_time_s_mean"] = sum(t["train_time_s"] for t in train) / len(train)
        row["it_per_s_mean"] = sum(t["it_per_s"] for t in train) / len(train)
        rows.append(row)
    return rows


def _cell(mean: float, ci: float) -> str:
    return _number(mean) if math.isnan(ci) else f"{_number(mean)} ± {_number(ci)}"


def settings_markdown(rows: list[dict], metric: str = "query_loss") -> str:
    """The rows of ``setting_rows`` as markdown, one line per setting."""
    steps = [k.removeprefix(f"{metric}_step").removesuffix("_mean") for k in rows[0]]
    steps = [s for s in steps if s.isdigit()]
    head = ["setting", "seeds", "objective"] + [f"{metric} @{s}" for s in steps]
    head += ["train time", "it/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["setting"], row["seeds"], _cell(row["objective_mean"], row["objective_ci95"])]
        cells += [
            _cell(row[f"{metric}_step{s}_mean"], row[f"{metric}_step{s}_ci95"]) for s in steps
        ]
        cells += [f"{row['train_time_s_mean']:.3g} s", f"{row['it_per_s_mean']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Mean ± 95% CI over seeds (Student's t; none for one seed) of each run's meta-test mean; "
        "objective: the value returned to the sweeper."
    )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
