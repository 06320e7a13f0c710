"""A run folder is never silently overwritten, and a refused resume changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maml_runner.errors import UserError
from maml_runner.run_folder import own_folder
from tests.helpers import QUICK, maml_run, read_metrics

STEPS = [o for o in QUICK if not o.startswith("trainer.steps")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    maml_run([*QUICK, f"hydra.run.dir={run}"], cwd=tmp_path)
    before = _snapshot(run)
    proc = maml_run([*QUICK, "seed=1", f"hydra.run.dir={run}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"hydra.run.dir={run}: already holds a run" in proc.stderr
    assert f"maml-run resume={run}" in proc.stderr
    assert _snapshot(run) == before


def test_runs_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    class Single:  # what own_folder reads of the composed config
        class hydra:
            mode = "RunMode.RUN"

    folders = [own_folder(["k=5"], Single)[-1] for _ in range(3)]
    names = [f.split("=", 1)[1] for f in folders]
    assert len(set(names)) == 3 and names[1] == f"{names[0]}-1" and names[2] == f"{names[0]}-2"
    assert all((tmp_path / n).is_dir() for n in names)
    with pytest.raises(UserError, match="already holds a run"):
        (tmp_path / names[0] / "metrics.jsonl").write_text("")
        own_folder([f"hydra.run.dir={names[0]}"], Single)


def test_a_refused_resume_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    maml_run([*STEPS, "trainer.steps=20", f"hydra.run.dir={run}"], cwd=tmp_path)
    before = _snapshot(run)
    for args, message in [
        (["model.hidden=[20,20]"], "the checkpoint's model differs"),
        (["trainer.steps=10"], "trainer.steps=10: "),
    ]:
        proc = maml_run([f"resume={run}", *args], cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert _snapshot(run) == before, f"resume {args} changed the run folder"
    # the plain resume still works afterwards, and records what it ran with
    maml_run([f"resume={run}", "trainer.steps=40"], cwd=tmp_path)
    assert read_metrics(run)["train"]["steps"] == 40
    assert "trainer.steps=40" in (run / ".hydra" / "overrides.yaml").read_text()


def test_resume_of_a_folder_that_is_not_a_run_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("a user's file")
    proc = maml_run([f"resume={folder}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: resume={folder}: no checkpoints/last.pt in that folder"
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]


def test_a_resumed_history_has_no_step_twice(tmp_path: Path) -> None:
    """A run killed after logging past its last checkpoint: the rows after the checkpoint are
    dropped on resume, so the history holds each step once, with the resumed run's values."""
    run = tmp_path / "run"
    maml_run([*STEPS, "trainer.steps=20", f"hydra.run.dir={run}"], cwd=tmp_path)
    history = run / "metrics.jsonl"
    stale = (
        '{"step": 30, "meta_train/query_loss": -1.0}\n{"step": 40, "meta_train/query_loss": -1.0}\n'
    )
    history.write_text(history.read_text() + stale)  # what a run killed at step 40 leaves
    maml_run([f"resume={run}", "trainer.steps=40"], cwd=tmp_path)
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    train = [(r["step"], r["meta_train/query_loss"]) for r in rows if "meta_train/query_loss" in r]
    assert [s for s, _ in train] == [10, 20, 30, 40]
    assert all(loss > 0 for _, loss in train)


def test_threads_auto_suits_the_model() -> None:
    from maml_runner.build import build
    from tests.helpers import DATA, make_config

    with build(make_config([*QUICK])) as job:
        assert job.num_threads == 1  # the sinusoid MLP
    with build(make_config([*QUICK, *DATA, "task=miniimagenet", "model=conv4"])) as job:
        assert job.num_threads is None  # convolutions: torch's default, one per core
    with build(make_config([*QUICK, "trainer.num_threads=2"])) as job:
        assert job.num_threads == 2


def test_a_refused_run_leaves_no_folder_even_after_logging(tmp_path: Path) -> None:
    """Refused after the data were decoded (and logged): the run's folder goes, its parent
    (not a claimed DATE folder) stays."""
    from tests.helpers import CACHE

    parent = tmp_path / "mine"
    parent.mkdir()
    args = ["task=miniimagenet", f"data.root={CACHE / 'miniimagenet'}", "n_way=50", "k=1"]
    fresh = f"data.cache_dir={tmp_path / 'cache'}"  # decodes anew, and logs it
    proc = maml_run([*QUICK, *args, fresh, f"hydra.run.dir={parent / 'run'}"], tmp_path, False)
    assert proc.returncode == 2 and "task.n_way=50: " in proc.stderr, proc.stderr
    assert parent.is_dir() and not list(parent.iterdir())
