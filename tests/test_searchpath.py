"""A user's own config folder through ``hydra.searchpath``: the CLI's pre-check honours it.

``maml-run 'hydra.searchpath=[file://./myconf]' model=mynet`` with ``./myconf/model/mynet.yaml``
must compose and run; a typo of an option still stops in one line with a "did you mean"; a
search path that does not exist is refused in one line (Hydra would skip it silently).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import typer

from maml_runner import cli
from tests.helpers import REPO, maml_run, read_metrics

MYNET = """\
# a user's model preset: their module by import path, with its own arguments
defaults:
  - custom
  - _self_

_target_: tests.nets.ResidualMLP
width: 12
blocks: 3
"""
TINY = [
    "trainer.steps=4",
    "trainer.val_every=2",
    "trainer.checkpoint_every=2",
    "trainer.val_tasks=3",
    "trainer.meta_batch_size=2",
    "eval.num_tasks=3",
    "logger.mode=disabled",
    "trainer.progress=false",
    "device=cpu",
]


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """``tmp_path/myconf/model/mynet.yaml``, as a user would write it."""
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "mynet.yaml").write_text(MYNET)
    return tmp_path


def refusal(capsys: pytest.CaptureFixture[str], overrides: list[str]) -> str:
    """The one line ``check_group_choices`` refuses ``overrides`` with (exit status 2)."""
    with pytest.raises(typer.Exit) as stop:
        cli.check_group_choices(overrides)
    assert stop.value.exit_code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_options_of_a_searchpath_folder_are_known(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    with_it = ["hydra.searchpath=[file://./myconf]", "model=mynet"]
    cli.check_group_choices(with_it)  # no exit
    options = cli.group_options(*cli.config_dirs(with_it))
    assert "mynet" in options["model"] and "conv4" in options["model"]  # the package's too
    assert cli.compose(with_it).model.width == 12
    # a bare folder (no scheme) and an absolute one are the same folder to Hydra
    cli.check_group_choices([f"hydra.searchpath=[{project / 'myconf'}]", "model=mynet"])
    cli.check_group_choices([f"+hydra.searchpath=[file://{project / 'myconf'}]", "model=mynet"])


def test_without_the_searchpath_the_option_is_unknown(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project)
    assert refusal(capsys, ["model=mynet"]).startswith("error: model=mynet: unknown model;")


def test_a_typo_is_refused_with_did_you_mean(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project)
    line = refusal(capsys, ["hydra.searchpath=[file://./myconf]", "model=mynett"])
    assert line.startswith("error: model=mynett: unknown model (did you mean mynet?); choose one")
    assert "mynet" in line.split("choose one of")[1] and "conv4" in line
    line = refusal(capsys, ["model=conv44"])
    assert line.startswith("error: model=conv44: unknown model (did you mean conv4?)")


@pytest.mark.parametrize(
    ("searchpath", "message"),
    [
        ("[file://./nope]", "hydra.searchpath=file://./nope: no such folder ("),
        ("[./nope]", "hydra.searchpath=./nope: no such folder ("),
        ("[pkg://no_such_pkg.conf]", "hydra.searchpath=pkg://no_such_pkg.conf: no importable"),
        ("[s3://bucket/conf]", "hydra.searchpath=s3://bucket/conf: unknown scheme s3://"),
    ],
    ids=["file", "bare", "pkg", "scheme"],
)
def test_a_searchpath_that_does_not_exist_is_refused(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    searchpath: str,
    message: str,
) -> None:
    monkeypatch.chdir(project)
    line = refusal(capsys, [f"hydra.searchpath={searchpath}", "model=mlp"])
    assert line.startswith(f"error: {message}"), line


def test_a_package_folder_on_the_searchpath(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.searchpath_dirs(["hydra.searchpath=[pkg://tests]"]) == [REPO / "tests"]


def test_a_run_from_the_users_folder_and_its_resume_from_elsewhere(project: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run_dir = project / "run"
    args = ["hydra.searchpath=[file://./myconf]", "model=mynet", *TINY]
    done = maml_run([*args, f"hydra.run.dir={run_dir}"], cwd=project, env=env)
    assert "model ResidualMLP: torch.func path" in done.stdout
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["stem.weight"].shape == (12, 1) and "blocks.2.weight" in state["model"]
    # the run's Hydra snapshot names the folder absolutely, so a resume from elsewhere finds it
    assert f"file://{project / 'myconf'}" in (run_dir / ".hydra" / "hydra.yaml").read_text()
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    maml_run([f"resume={run_dir}", "trainer.steps=6"], cwd=elsewhere, env=env)
    assert read_metrics(run_dir)["train"]["steps"] == 6
