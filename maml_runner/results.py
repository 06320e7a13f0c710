"""Run and sweep folders → tidy tables, the paper's numbers beside ours."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import torch
import yaml

from maml_runner.evaluation import EvalResult, mean_ci95
from maml_runner.tracking import HISTORY

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


# What every finished run's metrics.json holds (report.metrics writes them all).
REQUIRED = ("task", "algorithm", "seed", "meta_test", "train")
REQUIRED_TRAIN = ("steps", "train_time_s", "it_per_s")


@dataclass
class Collected:
    """What ``collect`` found: the readable runs, the unreadable files and the jobs without one.

    ``skipped`` pairs each metrics.json that was left out with why; ``unfinished`` lists the job
    folders (those with Hydra's ``.hydra/``) that hold no metrics.json at all (a diverged,
    stopped or running job: it leaves checkpoints/ or metrics.jsonl, but no metrics.json).
    """

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)


def problem(metrics: object) -> str | None:
    """Why ``metrics`` (a parsed metrics.json) is not a finished run's, or None if it is one."""
    if not isinstance(metrics, dict):
        return f"not a run's metrics (a JSON {type(metrics).__name__}, not an object)"
    missing = [key for key in REQUIRED if key not in metrics]
    if len(missing) == len(REQUIRED):
        return f"no run in it (none of {', '.join(REQUIRED)})"
    if missing:
        return f"no {', '.join(missing)} (a finished run's has {', '.join(REQUIRED)})"
    train = metrics["train"]
    if not isinstance(train, dict) or any(key not in train for key in REQUIRED_TRAIN):
        return f"train has no {' or '.join(REQUIRED_TRAIN)}"
    try:
        result = EvalResult.from_dict(metrics["meta_test"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return f"meta_test is not a meta-test result ({type(err).__name__}: {err})"
    if not result.mean:
        return "meta_test holds no metric"
    for name in result.mean:
        counts = {len(result.mean[name]), len(result.ci95[name])}
        if counts != {len(result.inner_steps)}:
            return (
                f"meta_test/{name} has {'/'.join(map(str, sorted(counts)))} values "
                f"for {len(result.inner_steps)} inner steps"
            )
    paper = metrics.get("paper")
    if paper is not None and not _is_paper(paper):
        return "paper is not a metric, steps and mean (and ci95) with one number per step"
    return None


def _is_paper(paper: object) -> bool:
    """Whether ``paper`` is a paper block: ``metric``, ``steps``, ``mean`` (and ``ci95``) alike."""
    if not isinstance(paper, dict) or not isinstance(paper.get("metric"), str):
        return False
    steps = paper.get("steps")
    lists = [paper.get("mean"), *([paper["ci95"]] if paper.get("ci95") else [])]
    return isinstance(steps, list) and all(
        isinstance(v, list) and len(v) == len(steps) for v in lists
    )


def read_run(path: Path) -> Run | str:
    """The run whose metrics.json is ``path``, or why it cannot be one (a short phrase)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return "not JSON (not UTF-8 text)"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if not text.strip():
        return "empty"
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON ({err.msg}: line {err.lineno} column {err.colno})"
    why = problem(metrics)
    return Run(path.parent, metrics) if why is None else why


def collect(paths: list[Path]) -> Collected:
    """Every finished run (a folder holding metrics.json) under ``paths``, sorted by folder.

    An unreadable metrics.json is skipped, with why; a job folder (``.hydra/``) without one is
    listed as unfinished.
    """
    files: list[Path] = []
    jobs: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob(METRICS)))
            jobs.extend(sorted(h.parent for h in path.rglob(".hydra") if h.is_dir()))
    found = Collected()
    for file in files:
        run = read_run(file)
        if isinstance(run, Run):
            found.runs.append(run)
        else:
            found.skipped.append((file, run))
    found.unfinished = [job for job in dict.fromkeys(jobs) if not (job / METRICS).exists()]
    return found


def contents(folder: Path) -> str:
    """What a job folder holds besides ``.hydra/``, e.g. ``checkpoints/, metrics.jsonl``."""
    names = [
        f"{p.name}/" if p.is_dir() else p.name
        for p in sorted(folder.iterdir())
        if p.name != ".hydra"
    ]
    return ", ".join(names) if names else "nothing but .hydra/"


def run_metric(run: Run) -> str:
    """The metric a table shows for ``run``: its paper's, else its accuracy (a classification
    run without a paper block sits beside those with one), else its first (query_loss, return)."""
    paper = run.metrics.get("paper")
    if paper and paper.get("metric") in run.result.mean:
        return paper["metric"]
    return next((m for m in run.result.mean if is_percent(m)), next(iter(run.result.mean)))


def _paper(run: Run, metric: str) -> dict:
    """``run``'s paper numbers if they are of ``metric``, else none: no return in an acc column."""
    paper = run.metrics.get("paper") or {}
    return paper if paper.get("metric") == metric else {}


def _steps(runs: list[Run], metric: str | None = None) -> list[int]:
    """The inner steps a table reports: every step the papers give (for ``metric``, if named),
    else 0, 1, 5, 10 (those the runs have)."""
    papers = [r.metrics.get("paper") or {} for r in runs]
    if metric is not None:
        papers = [_paper(r, metric) for r in runs]
    given = sorted({s for paper in papers for s in paper.get("steps", [])})
    if given:
        return given
    longest = max(len(r.result.inner_steps) for r in runs)
    return [s for s in (0, 1, 5, 10) if s < longest]


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.2g}"


def is_percent(metric: str) -> bool:
    """Accuracies (``query_acc``) are fractions in metrics.json and printed in %, as papers do."""
    return metric.endswith("_acc")


def shown(metric: str) -> tuple[float, str]:
    """How tables and plots show ``metric``: the factor its values are multiplied by and its
    name (accuracies in %, ``is_percent``)."""
    return (100.0, f"{metric} (%)") if is_percent(metric) else (1.0, metric)


def markdown_lines(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row of cells."""
    line = "| {} |".format
    return [line(" | ".join(head)), "|" + "---|" * len(head), *(line(" | ".join(r)) for r in rows)]


def ours_cell(mean: float, ci: float, metric: str) -> str:
    """Our mean ± 95% CI: accuracies in % with 2 decimals, other metrics as ``_number``."""
    if is_percent(metric):
        return f"{100 * mean:.2f} ± {100 * ci:.2f}"
    return f"{_number(mean)} ± {_number(ci)}"


def _decimals(value: float) -> int:
    """Digits after the point in ``value``'s shortest form (0.4870 → 3: YAML keeps no zeros)."""
    return max(0, -int(Decimal(repr(float(value))).normalize().as_tuple().exponent))


def paper_cell(paper: dict, step: int) -> str:
    """The paper's number at ``step`` as the paper prints it: ``98.7 ± 0.4``, ``48.70 ± 1.84``.

    Accuracies in %; with ``paper.ci95`` the ± part, else the mean alone; ``paper.decimals``
    (the digits the paper prints) keeps trailing zeros a YAML float drops. Without it, the most
    digits any of the block's numbers has: never a digit the YAML does not hold.
    """
    steps = list(paper.get("steps", []))
    if step not in steps:
        return ""
    scale = 100 if is_percent(paper["metric"]) else 1
    ci95 = paper.get("ci95") or []
    decimals = paper.get("decimals")
    if decimals is None:
        digits = [_decimals(v) for v in [*paper["mean"], *ci95]]
        decimals = max(0, max(digits) - (2 if scale == 100 else 0))
    at = steps.index(step)
    text = f"{scale * paper['mean'][at]:.{decimals}f}"
    return f"{text} ± {scale * ci95[at]:.{decimals}f}" if ci95 else text


def table_metric(runs: list[Run]) -> str:
    """The one metric of ``runs`` (a plot's): the first paper's that they have, else the first."""
    with_paper = [r for r in runs if _paper(r, run_metric(r))]
    return run_metric((with_paper or runs)[0])


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


def by_metric(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by the metric their table shows (``run_metric``), in order of appearance."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run_metric(run), []).append(run)
    return groups


def markdown_table(runs: list[Run], metric: str | None = None) -> str:
    """Per metric, a table of one row per run: mean ± 95% CI after each step, the paper's value.

    Runs of different metrics (accuracy, loss, return) get a table each, so a column never mixes
    them; ``metric`` forces one table. RL runs add a row for their random initialisation.
    """
    groups = {metric: runs} if metric else by_metric(runs)
    tables = [_metric_table(members, name) for name, members in groups.items()]
    devices = sorted({r.metrics.get("hardware", {}).get("device", "?") for r in runs})
    tasks = " / ".join(str(n) for n in sorted({r.result.num_tasks for r in runs}))
    footer = f"Hardware: {', '.join(devices)}. CI: 1.96·σ/√n over {tasks} test tasks."
    if any(is_percent(name) for name in groups):
        footer += " Accuracies in %."
    return "\n\n".join([*tables, footer])


def _metric_table(runs: list[Run], metric: str) -> str:
    """The markdown table of ``runs`` for ``metric`` alone (no footer)."""
    runs = _with_baselines(runs)
    steps = _steps(runs, metric)
    name = shown(metric)[1]
    head = ["run", "K (test)", "meta-iterations", "train time"]
    head += [f"{name} @{s} (ours)" for s in steps] + [f"@{s} (paper)" for s in steps]
    rows = []
    for run in runs:
        m, result = run.metrics, run.result
        paper = _paper(run, metric)
        cells = [
            run.label,
            str(m.get("eval_k_shot", "")),
            str(m["train"]["steps"]),
            f"{m['train']['train_time_s']:.0f} s",
        ]
        for s in steps:
            if metric in result.mean and s < len(result.inner_steps):
                cells.append(ours_cell(*result.at(metric, s), metric))
            else:
                cells.append("")
        cells += [paper_cell(paper, s) if paper else "" for s in steps]
        rows.append(cells)
    return "\n".join(markdown_lines(head, rows))


def plot_runs(runs: list[Run], path: Path, metric: str | None = None) -> Path:
    from maml_runner.plots import adaptation_curves

    metric = metric or table_metric(runs)
    # a run without ``metric`` (an RL run beside classification ones) has no curve to draw
    curves = {r.label: r.result for r in _with_baselines(runs) if metric in r.result.mean}
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
    """Mean ± CI; the mean alone without a CI (one seed); blank without a mean (a setting that
    does not report that step)."""
    if math.isnan(mean):
        return ""
    return _number(mean) if math.isnan(ci) else f"{_number(mean)} ± {_number(ci)}"


def settings_markdown(rows: list[dict], metric: str = "query_loss") -> str:
    """The rows of ``setting_rows`` as markdown, one line per setting."""
    steps = [k.removeprefix(f"{metric}_step").removesuffix("_mean") for k in rows[0]]
    steps = [s for s in steps if s.isdigit()]
    scale, name = shown(metric)
    head = ["setting", "seeds", "objective"] + [f"{name} @{s}" for s in steps]
    head += ["train time", "it/s"]
    table = []
    for row in rows:
        cells = [row["setting"], row["seeds"], _cell(row["objective_mean"], row["objective_ci95"])]
        cells += [
            _cell(scale * row[f"{metric}_step{s}_mean"], scale * row[f"{metric}_step{s}_ci95"])
            for s in steps
        ]
        cells += [f"{row['train_time_s_mean']:,.0f} s", f"{row['it_per_s_mean']:.3g}"]
        table.append(cells)
    footer = (
        "Mean ± 95% CI over seeds (Student's t; none for one seed) of each run's meta-test mean; "
        "objective: the value returned to the sweeper."
    )
    return "\n".join([*markdown_lines(head, table), "", footer])


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- equal wall clock: each setting's validation metric against its training time -------------


@dataclass
class Curve:
    """One run's validation of one metric (``meta_val/<metric>``) by step."""

    steps: list[int]
    times: list[float]  # seconds of training before each validation
    values: list[float]


def validation_curve(run: Run, metric: str) -> Curve | str:
    """The run's ``meta_val/<metric>`` against training time (its history's ``train_time_s``),
    or why it has none.

    A history written before ``train_time_s`` was logged is timed by its rows' wall clock, from
    the first logged speed on; if that disagrees with metrics.json's training time (the run was
    resumed, so the clock has a gap) the run has no curve.
    """
    key = f"meta_val/{metric}"
    path = run.folder / HISTORY
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"unreadable {HISTORY} ({type(err).__name__})"
    validations = [r for r in rows if isinstance(r.get(key), float | int)]
    if not validations:
        return f"no {key} in its {HISTORY} (trainer.val_every=0?)"
    steps = [int(r["step"]) for r in validations]
    values = [float(r[key]) for r in validations]
    if all("train_time_s" in r for r in validations):
        return Curve(steps, [float(r["train_time_s"]) for r in validations], values)
    times = _times_from_clock(rows, steps)
    total = run.metrics["train"]["train_time_s"]
    if times is None or times[-1] > total * 1.02 + 30:
        return (
            f"its {HISTORY} predates train_time_s and its clock disagrees with its training "
            f"time ({total:.0f} s): resumed?"
        )
    return Curve(steps, times, values)


def _times_from_clock(rows: list[dict], steps: list[int]) -> list[float] | None:
    """Training seconds at each of ``steps`` from the rows' wall clock (``time``): the first
    training row's speed gives the start; each step is timed by the last training row at or
    before it (the row logged just before its validation when log_every divides val_every)."""
    speed = "meta_train/it_per_s"
    train = [r for r in rows if r.get(speed) and "time" in r]
    if not train or train[0]["step"] > steps[0]:
        return None
    start = train[0]["time"] - train[0]["step"] / train[0][speed]
    times = []
    for step in steps:
        last = next(r for r in reversed(train) if r["step"] <= step)
        times.append(last["time"] - start + (step - last["step"]) / last[speed])
    return times


@dataclass
class Timed:
    """One setting's validation curve, mean (and 95% CI) over its seeds at their common steps."""

    label: str
    seeds: str
    steps: list[int]
    times: list[float]
    means: list[float]
    cis: list[float]


def timed_settings(
    settings: list[Setting], metric: str
) -> tuple[list[Timed], list[tuple[Path, str]]]:
    """Each setting's mean ``meta_val/<metric>`` curve over seeds; the runs left out, with why."""
    timed, left = [], []
    for setting in settings:
        curves = []
        for run in setting.runs:
            curve = validation_curve(run, metric)
            if isinstance(curve, str):
                left.append((run.folder, curve))
            else:
                curves.append((run, curve))
        common = sorted(set.intersection(*(set(c.steps) for _, c in curves))) if curves else []
        if curves and not common:
            left += [(r.folder, "its seeds share no validation step") for r, _ in curves]
        if not common:
            continue
        times, means, cis = [], [], []
        for step in common:
            at = [(c, c.steps.index(step)) for _, c in curves]
            times.append(sum(c.times[i] for c, i in at) / len(at))
            mean, ci = _over_seeds([c.values[i] for c, i in at])
            means.append(mean)
            cis.append(ci)
        seeds = " ".join(str(r.metrics["seed"]) for r, _ in curves)
        timed.append(Timed(setting.label, seeds, common, times, means, cis))
    return timed, left


def equal_time_budget(timed: list[Timed]) -> float:
    """The longest training time every setting reached: the shortest one's."""
    return min(t.times[-1] for t in timed)


def wall_clock_markdown(timed: list[Timed], metric: str) -> str:
    """Per setting: its validation ``metric`` at the last step within the common time budget
    (the shortest setting's training time), and at its end."""
    budget = equal_time_budget(timed)
    scale, name = shown(f"meta_val/{metric}")
    head = ["setting", "seeds", f"{name} within {budget:.0f} s (step, time)", "at the end"]
    rows = []
    for t in timed:
        within = max(j for j, time in enumerate(t.times) if time <= budget + 1e-6)
        cells = [t.label, t.seeds]
        for j in (within, len(t.steps) - 1):
            cell = _cell(scale * t.means[j], scale * t.cis[j])
            cells.append(f"{cell} (step {t.steps[j]}, {t.times[j]:.0f} s)")
        rows.append(cells)
    footer = (
        "Validation tasks, mean ± 95% CI over seeds (Student's t; none for one seed); time: "
        "seconds of training (validation included) before that validation, mean over seeds."
    )
    return "\n".join([*markdown_lines(head, rows), "", footer])


def plot_wall_clock(timed: list[Timed], path: Path, metric: str) -> Path:
    from maml_runner.plots import wall_clock_curves

    scale, name = shown(f"meta_val/{metric}")
    budget = equal_time_budget(timed)
    return wall_clock_curves(timed, path, budget=budget, ylabel=name, scale=scale)
