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
