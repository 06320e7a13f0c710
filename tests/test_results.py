"""``maml-run table`` and ``sweep-results`` on run folders written here: the paper's numbers as the
paper prints them, one table per metric, and bad run folders skipped with one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from maml_runner import cli
from maml_runner.paths import conf_dir
from tests.helpers import maml_run

# Finn et al. 2017 (arXiv 1703.03400), Table 1, as printed there (accuracy in %, ± 95% CI).
TABLE1 = {
    "finn17_omniglot_5w1s": "98.7 ± 0.4",
    "finn17_omniglot_5w5s": "99.9 ± 0.1",
    "finn17_omniglot_20w1s": "95.8 ± 0.3",
    "finn17_omniglot_20w5s": "98.9 ± 0.2",
    "finn17_omniglot_mlp_5w1s": "89.7 ± 1.1",
    "finn17_omniglot_mlp_5w5s": "97.5 ± 0.6",
    "finn17_miniimagenet_5w1s": "48.70 ± 1.84",
    "finn17_miniimagenet_5w5s": "63.11 ± 0.92",
    "finn17_miniimagenet_5w1s_fo": "48.07 ± 1.75",
    "finn17_miniimagenet_5w5s_fo": "63.15 ± 0.91",
}


def write_run(
    folder: Path,
    *,
    seed: int = 0,
    task: str = "omniglot",
    metrics: dict[str, list[float]] | None = None,
    paper: dict | None = None,
    baselines: dict | None = None,
) -> Path:
    """A finished run's folder, as ``report.finish`` and Hydra leave it (metrics.json, .hydra/)."""
    metrics = metrics or {"query_loss": [1.6, 0.3, 0.2, 0.1], "query_acc": [0.2, 0.9, 0.95, 0.97]}
    steps = len(next(iter(metrics.values())))
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
    test = {"inner_steps": list(range(steps)), "num_tasks": 600}
    test |= {m: {"mean": v, "ci95": [0.01] * steps} for m, v in metrics.items()}
    out = {
        "experiment": None,
        "task": task,
        "algorithm": "maml",
        "first_order": False,
        "k_shot": 1,
        "eval_k_shot": 1,
        "seed": seed,
        "meta_test": test,
        "meta_val": {"best": None},
        "train": {"steps": 100, "train_time_s": 2.0, "it_per_s": 50.0},
        "hardware": {"device": "cpu (2 cores, 1 threads)", "torch": "2.13.0+cpu"},
        "paper": paper,
        "objective": next(iter(metrics.values()))[-1],
    }
    if baselines:
        out["baselines"] = baselines
    (folder / "metrics.json").write_text(json.dumps(out, indent=2))
    return folder


def paper_block(preset: str) -> dict:
    return OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "experiment" / f"{preset}.yaml").paper
    )


def table(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.app, [*map(str, args)])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("preset", TABLE1)
def test_table_prints_table1_as_the_paper_does(tmp_path: Path, preset: str) -> None:
    paper = paper_block(preset)
    steps = [0.1] * (paper["steps"][-1] + 1)
    write_run(tmp_path / "run", metrics={"query_loss": steps, "query_acc": steps}, paper=paper)
    code, out, err = table("table", tmp_path)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| omniglot maml"))
    # ours in % too (0.1 ± 0.01 → 10.00 ± 1.00), then the paper's cell, digit for digit
    assert row.endswith(f"| 10.00 ± 1.00 | {TABLE1[preset]} |"), out
    assert f"query_acc (%) @{paper['steps'][-1]} (ours)" in out


def test_sinusoid_paper_numbers_have_no_ci_and_two_decimals(tmp_path: Path) -> None:
    paper = paper_block("finn17_sinusoid")
    write_run(tmp_path / "run", task="sinusoid", metrics={"query_loss": [4.0] * 11}, paper=paper)
    code, out, err = table("table", tmp_path)
    assert code == 0, err
    assert out.splitlines()[2].endswith("| 4.000 ± 0.010 | 0.67 | 0.38 | 0.35 |"), out


@pytest.mark.parametrize(
    "paper, cell",
    [
        # no `decimals` (a metrics.json from before it): the digits the YAML holds, no more
        ({"metric": "query_acc", "steps": [1], "mean": [0.4870], "ci95": [0.0184]}, "48.70 ± 1.84"),
        ({"metric": "query_acc", "steps": [1], "mean": [0.4870]}, "48.7"),
        ({"metric": "query_acc", "steps": [1], "mean": [0.4870], "decimals": 2}, "48.70"),
        ({"metric": "query_loss", "steps": [1], "mean": [0.30], "decimals": 2}, "0.30"),
        ({"metric": "query_loss", "steps": [1], "mean": [2.2, 0.35]}, "2.20"),
    ],
)
def test_paper_cell_keeps_the_written_precision(tmp_path: Path, paper: dict, cell: str) -> None:
    paper["mean"] = (paper["mean"] * 2)[:2]
    paper["steps"] = [1, 2]
    if "ci95" in paper:
        paper["ci95"] = paper["ci95"] * 2
    write_run(tmp_path / "run", paper=paper)
    code, out, err = table("table", tmp_path)
    assert code == 0, err
    assert out.splitlines()[2].split(" | ")[-2] == cell, out


def test_accuracy_and_return_never_share_a_column(tmp_path: Path) -> None:
    write_run(tmp_path / "omniglot", paper=paper_block("finn17_omniglot_5w1s"))
    returns = {"return": [-40.0, -20.0, -15.0, -12.0]}
    random_init = {"inner_steps": [0, 1, 2, 3], "num_tasks": 600}
    random_init["return"] = {"mean": [-99.0] * 4, "ci95": [1.0] * 4}
    write_run(
        tmp_path / "nav2d",
        task="nav2d",
        metrics=returns,
        paper=paper_block("finn17_nav2d"),
        baselines={"random_init": random_init},
    )
    code, out, err = table("table", tmp_path)
    assert code == 0, err
    tables = [t for t in out.split("\n\n") if t.startswith("|")]
    assert len(tables) == 2, out
    acc, ret = sorted(tables, key=lambda t: "return" in t.splitlines()[0])
    assert "query_acc (%) @3 (ours)" in acc and "return" not in acc and "nav2d" not in acc
    assert "| 98.7 ± 0.4 |" in acc
    assert "return @0 (ours)" in ret and "query_acc" not in ret and "omniglot" not in ret
    assert ret.splitlines()[2].endswith("| -40.41 | -11.68 | -3.33 | -3.23 |"), ret
    assert "nav2d random init" in ret and "Accuracies in %." in out


def test_a_classification_run_without_a_paper_block_shows_its_accuracy(tmp_path: Path) -> None:
    # the family table: MAML has a paper block, first-order MAML's short preset none
    write_run(tmp_path / "maml", paper=paper_block("finn17_omniglot_5w1s"))
    write_run(tmp_path / "fo", seed=1)
    code, out, err = table("table", tmp_path)
    assert code == 0, err
    tables = [t for t in out.split("\n\n") if t.startswith("|")]
    assert len(tables) == 1 and "query_loss" not in out, out
    rows = tables[0].splitlines()[2:]
    assert [r.split(" | ")[-2] for r in rows] == ["97.00 ± 1.00"] * 2, out
    fo, maml = rows  # sorted by folder
    assert maml.endswith("| 98.7 ± 0.4 |") and fo.endswith("|  |"), out


def bad_sweep(root: Path) -> Path:
    """A multirun: jobs 0 and 5 finished; 1 empty, 2 cut off, 3 `{}`; 4 diverged (no metrics)."""
    sweep = root / "multirun" / "2025-01-01" / "00-00-00"
    for number in (0, 5):
        write_run(sweep / str(number), seed=number)
    for number, text in ((1, ""), (2, '{"task": "omniglot", "meta_te'), (3, "{}")):
        (sweep / str(number) / ".hydra").mkdir(parents=True)
        (sweep / str(number) / "metrics.json").write_text(text)
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / "checkpoints").mkdir()
    (sweep / "4" / "metrics.jsonl").write_text('{"step": 10, "meta_train/query_loss": NaN}\n')
    return sweep


@pytest.mark.parametrize("command", ["table", "sweep-results"])
def test_bad_run_folders_are_skipped_and_named(tmp_path: Path, command: str) -> None:
    sweep = bad_sweep(tmp_path)
    code, out, err = table(command, sweep.parent.parent)
    assert code == 0, err
    assert "Traceback" not in out + err
    if command == "table":
        assert "omniglot maml (seed 0)" in out and "omniglot maml (seed 5)" in out
    else:
        assert "| omniglot maml | 0 5 |" in out
    lines = err.splitlines()
    assert lines[:3] == [
        f"skipped {sweep / '1' / 'metrics.json'}: empty",
        f"skipped {sweep / '2' / 'metrics.json'}: not JSON "
        "(Unterminated string starting at: line 1 column 22)",
        f"skipped {sweep / '3' / 'metrics.json'}: no run in it "
        "(none of task, algorithm, seed, meta_test, train)",
    ]
    assert lines[3].startswith("no results from 1 job(s) without metrics.json (diverged")
    assert lines[4:] == [f"  {sweep / '4'} (checkpoints/, metrics.jsonl)"]


def test_a_folder_with_no_valid_run_is_one_line_and_exit_2(tmp_path: Path) -> None:
    sweep = bad_sweep(tmp_path)
    for number in (0, 5):
        (sweep / str(number) / "metrics.json").write_text("[1, 2]")
    proc = maml_run(["table", str(sweep)], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 6 and all(line.startswith("skipped ") for line in lines[:5]), lines
    assert "a JSON list, not an object" in lines[0]
    assert lines[-1] == (
        f"error: paths={sweep}: none of its 5 metrics.json is a finished run's "
        "(see the lines above)"
    )


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("meta_test", {"query_acc": [0.5]}, "meta_test/query_acc has 1/4 values for 4 inner steps"),
        (
            "paper",
            {"metric": "query_acc", "steps": [3], "mean": []},
            "paper is not a metric, steps and mean (and ci95) with one number per step",
        ),
    ],
)
def test_a_half_written_result_names_its_key(
    tmp_path: Path, key: str, value: dict, why: str
) -> None:
    run = write_run(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    if key == "meta_test":
        metrics["meta_test"]["query_acc"]["mean"] = value["query_acc"]
    else:
        metrics[key] = value
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = table("sweep-results", tmp_path)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"skipped {run / 'metrics.json'}: {why}",
        f"error: paths={tmp_path}: none of its 1 metrics.json is a finished run's "
        "(see the lines above)",
    ]
