"""Sweeps on Hydra's plugins (joblib, submitit_local, Optuna) and the sweep-results table.

The plugin tests run the installed ``maml-run`` end to end and skip, saying which, only where
the ``sweeps`` extra is missing (CI installs it).
"""

from __future__ import annotations

import csv
import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from maml_runner import cli
from tests.helpers import maml_run, read_metrics


def needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        find_spec(f"hydra_plugins.{module}") is None,
        reason=f"{module.replace('_', '-')} not installed (pip install 'maml-runner[sweeps]')",
    )


# Fewer overrides than QUICK: each becomes part of a job's folder name.
SHORT = ["trainer.steps=20", "trainer.val_every=0", "eval.num_tasks=10", "logger.mode=disabled"]


@needs("hydra_joblib_launcher")
def test_joblib_runs_two_jobs_at_once_grouped_in_wandb(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep_g7q"
    quick = [o for o in SHORT if not o.startswith("logger.")]
    args = ["-m", "launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *quick]
    maml_run([*args, "logger.mode=offline", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert sorted(read_metrics(j)["seed"] for j in jobs) == [0, 1]
    # Jobs ran in joblib's worker processes; each W&B run is still named <sweep>/<job number>
    # from the same group (the sweep folder's name).
    for number, job in enumerate(jobs):
        data = next(job.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
        assert f"sweep_g7q/{number}".encode() in data


@needs("hydra_submitit_launcher")
def test_submitit_local_runs_the_slurm_path_without_a_cluster(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    maml_run(
        ["-m", "launcher=submitit_local", "seed=0,1", *SHORT, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert sorted(read_metrics(p.parent)["seed"] for p in sweep.glob("*/metrics.json")) == [0, 1]
    assert (sweep / ".submitit").is_dir(), "jobs went through submitit"


@needs("hydra_optuna_sweeper")
def test_optuna_search_reads_the_returned_objective(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # the objective is the validation loss (never a test figure): validation must be on
    short = [o for o in SHORT if not o.startswith("trainer.val_every")] + ["trainer.val_every=10"]
    args = ["hparams_search=sinusoid_lr", "hydra.sweeper.n_trials=3", *short]
    proc = maml_run([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    trials = [read_metrics(p.parent) for p in sweep.glob("*/metrics.json")]
    assert len(trials) == 3
    for trial in trials:
        assert trial["objective_metric"] == "meta_val/query_loss"
        assert trial["objective"] == trial["meta_val"]["best"]["value"]
        assert trial["meta_test"]["step"] == trial["meta_val"]["best"]["step"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"inner.lr", "outer.lr"}
    assert best["best_value"] == pytest.approx(min(t["objective"] for t in trials))
    assert "needs validation" not in proc.stderr
    refused = maml_run([*args[:2], *SHORT], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "trainer.val_every=0: a search" in refused.stderr
    lrs = {
        json.dumps(yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())[:2])
        for p in sweep.iterdir()
        if p.is_dir()
    }
    assert len(lrs) == 3, "each trial got its own inner.lr and outer.lr"


@pytest.mark.parametrize(
    "override", ["launcher=joblib", "hydra/launcher=submitit_slurm", "hparams_search=omniglot_lr"]
)
def test_a_missing_plugin_gives_the_install_command(override: str, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a),
    )
    result = CliRunner().invoke(cli.app, ["config", override])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0, result.output
    assert "needs the Hydra plugin hydra-" in result.output
    assert "pip install 'maml-runner[sweeps]'" in result.output


def _fake_run(folder: Path, seed: int, overrides: list[str], losses: list[float]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    metrics = {
        "experiment": None,
        "task": "sinusoid",
        "algorithm": "maml",
        "seed": seed,
        "objective": losses[-1],
        "meta_test": {
            "inner_steps": list(range(len(losses))),
            "num_tasks": 600,
            "query_loss": {"mean": losses, "ci95": [0.1] * len(losses)},
        },
        "train": {"steps": 100, "train_time_s": 2.0, "it_per_s": 50.0},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_results_mean_and_ci_over_seeds_per_setting(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    number = 0
    for lr, base in (("0.01", 1.0), ("0.1", 2.0)):
        for seed, shift in enumerate((0.0, 0.1, 0.2)):
            losses = [base + shift + 1.0] + [base + shift] * 10
            _fake_run(
                sweep / str(number), seed, ["k=5", f"inner.lr={lr}", "launcher=joblib"], losses
            )
            number += 1
    table, out_csv = tmp_path / "table.md", tmp_path / "table.csv"
    result = CliRunner().invoke(
        cli.app, ["sweep-results", str(sweep), "--csv", str(out_csv), "--out", str(table)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["setting"] for r in rows] == ["inner.lr=0.01", "inner.lr=0.1"]
    assert rows[0]["seeds"] == "0 1 2" and rows[0]["n_seeds"] == "3"
    # mean of (1.0, 1.1, 1.2) = 1.1; σ = 0.1; t(2 dof) = 4.303: CI = 4.303 · 0.1 / √3
    assert float(rows[0]["objective_mean"]) == pytest.approx(1.1)
    assert float(rows[0]["objective_ci95"]) == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert float(rows[1]["query_loss_step0_mean"]) == pytest.approx(3.1)
    text = table.read_text()
    assert "| inner.lr=0.1 | 0 1 2 | 2.100 ± 0.248 |" in text and text in result.output + "\n"


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (["k=5,0,10"], "job 1 of the sweep's 3 (k=0) is invalid, so none was launched: k=0: "),
        (
            ["seed=1,2", "trainer.meta_batch_size=4,abc"],
            "job 1 of the sweep's 4 (seed=1 trainer.meta_batch_size=abc) is invalid (and 1 "
            "more), so none was launched: trainer.meta_batch_size=abc: must be an integer",
        ),
        (
            ["table=finn17_sinusoid", "inner.lr=0.01,-1"],
            "is invalid (and 5 more), so none was launched: inner.lr=-1",
        ),
    ],
)
def test_a_sweep_validates_every_job_before_launching_one(
    tmp_path: Path, sweep: list[str], message: str
) -> None:
    proc = maml_run(
        ["-m", *sweep, "trainer.steps=2", "logger.mode=disabled"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr, proc.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_a_table_preset_is_a_sweep_checked_before_its_first_job(tmp_path: Path) -> None:
    """A table sets hydra.mode=MULTIRUN itself (no -m): its jobs are checked all the same."""
    proc = maml_run(
        ["table=finn17_sinusoid", "inner.lr=0.01,-1", "trainer.steps=2"], cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "of the sweep's 12 (" in proc.stderr and "none was launched: inner.lr=-1" in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_a_path_override_leaves_the_job_folders_flat(tmp_path: Path) -> None:
    """A path's '/' would nest a job's folder; path keys stay in .hydra/overrides.yaml only."""
    sweep, cache = tmp_path / "sweep", tmp_path / "data" / "cache"
    maml_run(
        ["-m", "seed=0,1", *SHORT, f"data.cache_dir={cache}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        assert (job / "metrics.json").is_file() and "cache_dir" not in job.name
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"data.cache_dir={cache}" in overrides


KEY = "meta_val/query_acc"


def _timed_run(
    folder: Path,
    seed: int,
    setting: str,
    vals: list[tuple[int, float, float]],
    test: tuple[float, ...] = (0.2, 0.9),
) -> None:
    """A finished classification run validated at (step, training seconds, accuracy) ``vals``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([setting, f"seed={seed}"]))
    steps = vals[-1][0]
    metrics = {
        "experiment": None,
        "task": "omniglot",
        "algorithm": "maml",
        "seed": seed,
        "objective": 0.9,
        "meta_test": {
            "inner_steps": list(range(len(test))),
            "num_tasks": 600,
            "query_acc": {"mean": list(test), "ci95": [0.01] * len(test)},
            "query_loss": {"mean": [1 - a for a in test], "ci95": [0.01] * len(test)},
        },
        "meta_val": {"best": {"key": KEY, "value": max(v for *_, v in vals), "step": steps}},
        "train": {"steps": steps, "train_time_s": vals[-1][1], "it_per_s": 1.0},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = []
    for step, time, value in vals:
        rows.append({"step": step, "time": 5e8 + time, "train_time_s": time, "meta_train/x": 1})
        validation = {KEY: value, "meta_val/query_loss": 1 - value}
        rows.append({"step": step, "time": 5e8 + time + 3, "train_time_s": time, **validation})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_wall_clock_compares_settings_within_the_shortest_ones_training_time(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "sweep"
    slow = [(10, 10.0, 0.5), (20, 20.0, 0.6), (30, 30.0, 0.7)]
    fast = [(10, 5.0, 0.4), (20, 12.0, 0.8)]
    for seed in (0, 1):
        bump = 0.02 * seed
        _timed_run(  # tested after 0..5 steps, the fast setting after 0..1
            sweep / f"a{seed}",
            seed,
            "algorithm=slow",
            [(s, t, v + bump) for s, t, v in slow],
            (0.2, 0.9, 0.91, 0.92, 0.93, 0.95),
        )
        _timed_run(
            sweep / f"b{seed}", seed, "algorithm=fast", [(s, t + seed, v) for s, t, v in fast]
        )
    png = tmp_path / "clock.png"
    result = CliRunner().invoke(
        cli.app, ["sweep-results", str(sweep), "--metric", "query_acc", "--wall-clock", str(png)]
    )
    assert result.exit_code == 0, result.output
    # the fast setting trained 12 and 13 s (mean 12.5): the budget; the slow one's last
    # validation within it is step 10 (10 s), the fast one's its end
    assert "| setting | seeds | meta_val/query_acc (%) within 12 s (step, time) | at the end |" in (
        result.stdout
    )
    assert (
        "| algorithm=slow | 0 1 | 51.000 ± 12.706 (step 10, 10 s) | "
        "71.000 ± 12.706 (step 30, 30 s) |" in result.stdout
    )
    assert (
        "| algorithm=fast | 0 1 | 80.000 ± 0.000 (step 20, 12 s) | 80.000 ± 0.000 (step 20, 12 s) |"
        in result.stdout
    )
    # the seeds' table prints accuracies in % too (the CSV keeps metrics.json's fractions)
    assert (
        "| algorithm=slow | 0 1 | 0.900 ± 0.000 | 20.000 ± 0.000 | 90.000 ± 0.000 | "
        "95.000 ± 0.000 | 30 s |" in result.stdout
    )  # a step a setting does not report is blank
    assert (
        "| algorithm=fast | 0 1 | 0.900 ± 0.000 | 20.000 ± 0.000 | 90.000 ± 0.000 |  | 12 s |"
        in (result.stdout)
    )
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # --metric picks the validation curve too (the runs chose their best θ on accuracy)
    result = CliRunner().invoke(
        cli.app, ["sweep-results", str(sweep), "--metric", "query_loss", "--wall-clock", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "| algorithm=slow | 0 1 | 0.490 ± 0.127 (step 10, 10 s) |" in result.stdout
    assert "meta_val/query_loss within 12 s" in result.stdout and "(%)" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["table", "--plot", "{tmp}/no/such/a.png"], "--plot {tmp}/no/such/a.png: folder "),
        (["sweep-results", "--out", "{tmp}/no/t.md"], "--out {tmp}/no/t.md: folder {tmp}/no "),
        (["sweep-results", "--wall-clock", "{tmp}"], "--wall-clock {tmp}: is a folder; give a"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_first(
    tmp_path: Path, args: list[str], message: str
) -> None:
    sweep = tmp_path / "sweep"
    _timed_run(sweep / "a", 0, "algorithm=a", [(10, 10.0, 0.5)])
    before = sorted(tmp_path.rglob("*"))
    command, *rest = (a.format(tmp=tmp_path) for a in args)
    result = CliRunner().invoke(cli.app, [command, str(sweep), *rest])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message.format(tmp=tmp_path) in result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_wall_clock_reads_a_history_from_before_train_time_s_by_its_clock(tmp_path: Path) -> None:
    """Older histories have only the wall clock: the first logged speed dates the start; a
    resumed one (a gap in the clock) is left out, named, and with no run left: one line, exit 2."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for folder, gap in ((fresh, 0.0), (resumed, 3600.0)):
        _timed_run(folder, 0, f"gap={gap}", [(10, 20.0, 0.5), (20, 40.0, 0.6)])
        rows = [  # 2 it/s logged every 10 steps from t=100; validations take 3 s; then the gap
            {"step": 10, "time": 105.0, "meta_train/it_per_s": 2.0},
            {"step": 10, "time": 108.0, KEY: 0.5},
            {"step": 20, "time": 113.0 + gap, "meta_train/it_per_s": 2.0},
            {"step": 20, "time": 114.0 + gap, KEY: 0.6},
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from maml_runner.results import Run, read_run, validation_curve

    run = read_run(fresh / "metrics.json")
    assert isinstance(run, Run)
    curve = validation_curve(run, "query_acc")
    assert not isinstance(curve, str) and curve.times == [5.0, 13.0] and curve.values == [0.5, 0.6]
    png = tmp_path / "clock.png"
    result = CliRunner().invoke(
        cli.app, ["sweep-results", str(resumed), "--metric", "query_acc", "--wall-clock", str(png)]
    )
    assert result.exit_code == 2 and not png.exists()
    assert f"--wall-clock leaves out {resumed}: its metrics.jsonl predates train_time_s" in (
        result.stderr
    )
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --wall-clock {png}: no run has a meta_val/query_acc curve (see the lines above)"
    )


def test_a_run_logs_its_training_time_with_every_row(tmp_path: Path) -> None:
    run = tmp_path / "run"
    maml_run(
        [*SHORT, "trainer.val_every=10", "trainer.log_every=5", f"hydra.run.dir={run}"],
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if not any(k.startswith("meta_test/") for k in r)]
    assert [r["step"] for r in timed] == [5, 10, 10, 15, 20, 20]
    times = [r["train_time_s"] for r in timed]
    assert times == sorted(times) and 0 < times[0]
    assert times[-1] <= read_metrics(run)["train"]["train_time_s"]
    assert (
        "meta_val/query_loss" in timed[2] and timed[1]["train_time_s"] <= timed[2]["train_time_s"]
    )
