"""The evaluation protocol: selection on validation only, best.pt, NaN, meaningful statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from maml_runner import app, checkpoint
from maml_runner.evaluation import EvalResult
from maml_runner.trainer import Cadence, Validation, fit
from tests.helpers import DATA, QUICK, make_config, maml_run, needs_omniglot, read_metrics


class Recorder:
    """A real Saver: keeps what it was asked to write, so a test can read the steps."""

    def __init__(self) -> None:
        self.last: list[int] = []
        self.best: list[int] = []

    def save(self, step: int, best: dict | None, train_time: float) -> None:
        self.last.append(step)

    def save_best(self, step: int, best: dict, train_time: float) -> None:
        self.best.append(step)

    def validated(self, step: int, this: dict, maximize: bool, train_time: float) -> None:
        pass


class History:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, metrics: dict[str, float], step: int, train_time: float | None = None) -> None:
        self.rows.append({"step": step, **metrics})


def _fit(
    values: dict[int, float],
    steps: int,
    val_every: int,
    maximize: bool = False,
    progress: bool = False,
):
    """fit() on a one-parameter problem, with validation figures ``values[step]``."""
    theta = {"w": torch.zeros(1, requires_grad=True)}
    clock = {"step": 0}

    def update(step: int) -> torch.Tensor:
        clock["step"] = step + 1
        return torch.tensor(0.5)

    def validate() -> dict[str, float]:
        return {"meta_val/x": values[clock["step"]]}

    saver = Recorder()
    fitted = fit(
        update,
        theta,
        Cadence(steps, val_every, checkpoint_every=10, log_every=5, progress=progress),
        tracker=History(),
        checkpointer=saver,
        validation=Validation(validate, "meta_val/x", maximize),
        metrics=("meta_train/x",),
    )
    return fitted, saver


def test_progress_goes_to_a_log_file_as_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """stderr not a terminal (nohup, a cluster log): no live bar, which would show only at the
    end; a line at a logged step once PROGRESS_LINE_S have passed, and one at the last step."""
    from maml_runner import trainer

    _fit({15: 3.0, 20: 2.0}, steps=20, val_every=15, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "meta-train" in line]
    assert len(lines) == 1 and "meta-train 20/20: " in lines[0] and "x 0.5" in lines[0]
    assert lines[0].rstrip().endswith("trained, ETA 0:00:00") and "━" not in lines[0]
    monkeypatch.setattr(trainer, "PROGRESS_LINE_S", 0.0)
    _fit({15: 3.0, 20: 2.0}, steps=20, val_every=15, progress=True)
    err = capsys.readouterr().err
    assert [f"meta-train {s}/20: " in err for s in (5, 10, 15, 20)] == [True] * 4


def test_best_is_saved_at_the_best_validation_step_not_at_a_checkpoint_step() -> None:
    # validation every 15, checkpoints every 10, 50 steps: validations at 15, 30, 45 and 50
    fitted, saver = _fit({15: 3.0, 30: 2.0, 45: 1.0, 50: 1.5}, steps=50, val_every=15)
    assert fitted.best["step"] == 45 and saver.best == [15, 30, 45]
    assert saver.last == [10, 20, 30, 40, 50]
    assert fitted.last_validation == {"key": "meta_val/x", "value": 1.5, "step": 50}
    # 20 steps: validations at 15 and 20 (the last step); a best exists
    fitted, saver = _fit({15: 3.0, 20: 2.5}, steps=20, val_every=15)
    assert fitted.best["step"] == 20 and saver.best == [15, 20]


def test_a_nan_validation_is_never_the_best() -> None:
    fitted, saver = _fit({10: math.nan, 20: 4.0, 30: math.nan}, steps=30, val_every=10)
    assert fitted.best == {"key": "meta_val/x", "value": 4.0, "step": 20} and saver.best == [20]
    fitted, _ = _fit({10: math.nan, 20: math.inf}, steps=20, val_every=10, maximize=True)
    assert fitted.best is None


def test_best_pt_the_tested_step_and_the_objective_are_the_validations(tmp_path: Path) -> None:
    """val_every=15, checkpoint_every=10, 50 steps: best.pt is the best validation step's θ,
    the meta-test tests it, and the returned objective is its validation loss."""
    overrides = [*QUICK, "trainer.steps=50", "trainer.val_every=15", "trainer.checkpoint_every=10"]
    objective = app.run(make_config(overrides), tmp_path)
    metrics = read_metrics(tmp_path)
    best = metrics["meta_val"]["best"]
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["step"] == best["step"]
    assert metrics["meta_test"]["checkpoint"] == "best"
    assert metrics["meta_test"]["step"] == best["step"]
    assert objective == metrics["objective"] == best["value"]
    assert metrics["objective_metric"] == "meta_val/query_loss"
    # the same θ through `maml-run evaluate best.pt` gives the same test numbers
    maml_run(["evaluate", str(tmp_path / "checkpoints" / "best.pt")], cwd=tmp_path)
    [out] = (tmp_path / "checkpoints").glob("eval_step*.json")
    assert out.name.startswith(f"eval_step{best['step']}_")
    again = json.loads(out.read_text())["meta_test"]
    assert again["query_loss"] == metrics["meta_test"]["query_loss"]
    # each test task's figures come with the means, last, and give them back
    tested = metrics["meta_test"]
    assert list(tested)[-1] == "per_task" and again["per_task"] == tested["per_task"]
    assert list(tested["per_task"]) == ["query_loss"]  # regression: the one metric
    for name, rows in tested["per_task"].items():
        assert len(rows) == len(tested["inner_steps"])
        assert all(len(row) == tested["num_tasks"] for row in rows)
        means = [sum(row) / len(row) for row in rows]
        assert means == pytest.approx(tested[name]["mean"], rel=1e-6)


def test_eval_checkpoint_last_and_no_validation(tmp_path: Path) -> None:
    last = app.run(make_config([*QUICK, "eval.checkpoint=last"]), tmp_path / "last")
    metrics = read_metrics(tmp_path / "last")
    assert metrics["meta_test"]["checkpoint"] == "last" and metrics["meta_test"]["step"] == 40
    history = (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()
    final = [r for r in history if '"step": 40' in r and "meta_val/query_loss" in r]
    assert final and last == metrics["objective"]
    none = app.run(make_config([*QUICK, "trainer.val_every=0"]), tmp_path / "none")
    metrics = read_metrics(tmp_path / "none")
    assert math.isnan(none) and metrics["objective"] is None
    assert metrics["objective_metric"] is None and metrics["meta_test"]["checkpoint"] == "last"


@needs_omniglot
def test_classification_selects_on_validation_accuracy(tmp_path: Path) -> None:
    cfg = make_config(
        [*QUICK, "task=omniglot", "model=conv4", "model.filters=8", "trainer.steps=20"]
        + ["trainer.val_every=10", "trainer.meta_batch_size=2"]
    )
    objective = app.run(cfg, tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics["objective_metric"] == "meta_val/query_acc"
    assert objective == -metrics["meta_val"]["best"]["value"] < 0


def test_diverged_tasks_are_counted_and_the_median_reported() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, math.nan]])
    result = EvalResult.of({"query_loss": values})
    assert result.diverged == [0, 1] and result.num_tasks == 4
    assert result.median["query_loss"] == [2.0, 2.0]  # torch's lower median, NaN left out
    assert math.isnan(result.mean["query_loss"][1])
    again = EvalResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.diverged == [0, 1] and again.median == result.median
    assert again.per_task["query_loss"][0] == [1.0, 2.0, 3.0, 4.0]
    assert math.isnan(again.per_task["query_loss"][1][3])  # the diverged task, kept as NaN


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval.num_tasks=1"], "eval.num_tasks=1: a mean ± 95% CI over test tasks needs at least"),
        pytest.param(
            ["task=omniglot", *DATA, "n_way=1"],
            "task.n_way=1: must be an integer >= 2",
            marks=needs_omniglot,
        ),
        (["eval.checkpoint=first"], "eval.checkpoint=first: choose one of best, last"),
    ],
)
def test_meaningless_statistics_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    proc = maml_run([*QUICK, *args], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("metrics.json"))


# ------------------------------------------------------------- evaluate: overrides and ensembles


def test_ensemble_averages_the_members_adapted_predictions() -> None:
    """Each member adapts on its own (plain SGD here); the query predictions are averaged at
    every step before the loss: checked against a per-task loop written out by hand."""
    from torch.func import functional_call

    from maml_runner.evaluation import ensemble_test
    from maml_runner.maml import MAML, regression_loss
    from maml_runner.models import MLP
    from maml_runner.tasks import FixedTasks, Sinusoid

    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8,))
    thetas = [{n: torch.randn_like(p) * 0.5 for n, p in model.named_parameters()} for _ in "ab"]
    params = dict(model.named_parameters())
    cpu = torch.device("cpu")
    tasks = FixedTasks(Sinusoid(), num_tasks=6, k_shot=5, query_size=7, seed=3, device=cpu, chunk=4)
    learner = MAML(model, regression_loss(), inner_lr=0.05, inner_steps=1)

    def load(theta: dict) -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n])

    members = [lambda t=t: load(t) for t in thetas]
    batches = list(tasks.batches())
    result = ensemble_test(learner, params, tasks, members, steps=2)

    expected = []
    for batch in tasks.batches():
        for i in range(batch.num_tasks):
            sx, sy = batch.support_x[i], batch.support_y[i]
            qx, qy = batch.query_x[i], batch.query_y[i]
            preds = [[], [], []]
            for theta in thetas:
                w = {n: v.clone().requires_grad_() for n, v in theta.items()}
                for s in range(3):
                    preds[s].append(functional_call(model, w, (qx,)).detach())
                    loss = ((functional_call(model, w, (sx,)) - sy) ** 2).mean()
                    grads = torch.autograd.grad(loss, list(w.values()))
                    w = {
                        n: (v - 0.05 * g).detach().requires_grad_()
                        for (n, v), g in zip(w.items(), grads)
                    }
            expected.append([((sum(p) / 2 - qy) ** 2).mean().item() for p in preds])
    expected = torch.tensor(expected).mean(0).tolist()
    assert result.num_tasks == 6 and len(batches) == 2
    assert result.mean["query_loss"] == pytest.approx(expected, rel=1e-4)


def _kept(run: Path) -> list[int]:
    return sorted(int(p.stem[4:]) for p in (run / "checkpoints" / "top").glob("step*.pt"))


def test_keep_best_keeps_the_top_validation_steps_and_resumes_them(tmp_path: Path) -> None:
    common = [*QUICK, "trainer.val_every=10", "trainer.keep_best=2", "trainer.checkpoint_every=20"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    app.run(make_config([*common, "trainer.steps=60"]), whole)
    values = {
        r["step"]: r["meta_val/query_loss"] for r in _history(whole) if "meta_val/query_loss" in r
    }
    best_two = sorted(sorted(values, key=values.get)[:2])
    assert _kept(whole) == best_two
    top = checkpoint.load(whole / "checkpoints" / "last.pt")["extra"]["top"]
    assert [r["step"] for r in top] == sorted(values, key=values.get)[:2]
    for r in top:  # each kept file holds θ of its step
        assert (
            checkpoint.load(whole / "checkpoints" / "top" / f"step{r['step']}.pt")["step"]
            == r["step"]
        )

    app.run(make_config([*common, "trainer.steps=40"]), half)
    # a killed run's later validation file is not one of the resumed run's
    (half / "checkpoints" / "top" / "step50.pt").write_bytes(b"stale")
    app.run(make_config([*common, "trainer.steps=60", f"resume={half}"]), half)
    assert _kept(half) == best_two
    assert (
        checkpoint.load(half / "checkpoints" / "top" / f"step{best_two[-1]}.pt")["step"]
        == best_two[-1]
    )


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_keep_best_without_validation_is_refused(tmp_path: Path) -> None:
    from maml_runner.errors import UserError

    with pytest.raises(UserError, match="trainer.keep_best=3: keeps the best validation steps"):
        app.run(make_config([*QUICK, "trainer.val_every=0", "trainer.keep_best=3"]), tmp_path)


def test_evaluate_takes_overrides_prints_every_step_and_ensembles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*QUICK, "trainer.val_every=10", "trainer.keep_best=3", "eval.num_tasks=20"]
    maml_run([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    metrics = read_metrics(run)

    # a run folder is evaluated at the θ its own meta-test used (best.pt): the same numbers
    out = maml_run(["evaluate", str(run), "--ensemble", "1"], cwd=tmp_path).stdout
    assert "best validation step" in out
    [plain] = (run / "checkpoints").glob("eval_step*.json")
    record = json.loads(plain.read_text())
    assert record["meta_test"]["query_loss"] == metrics["meta_test"]["query_loss"]
    # an ensemble of the single best member is that member
    assert record["ensemble"]["meta_test"]["query_loss"] == metrics["meta_test"]["query_loss"]

    out = maml_run(
        ["evaluate", str(run), "inner.lr=0.02", "inner.eval_steps=3", "task.eval_k_shot=10",
         "eval.num_tasks=15", "--ensemble", "3"], cwd=tmp_path,
    ).stdout  # fmt: skip
    for step in range(4):  # every computed step is printed, not only eval.report_steps
        assert f"│ {step:>11} │" in out
    [new] = set((run / "checkpoints").glob("eval_step*.json")) - {plain}
    record = json.loads(new.read_text())
    assert record["overrides"] == [
        "inner.lr=0.02", "inner.eval_steps=3", "task.eval_k_shot=10", "eval.num_tasks=15"
    ]  # fmt: skip
    assert record["meta_test"]["num_tasks"] == 15 and len(record["meta_test"]["inner_steps"]) == 4
    assert len(record["ensemble"]["steps"]) == 3
    assert record["ensemble"]["meta_test"]["query_loss"] != record["meta_test"]["query_loss"]

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    for bad, message in [
        (["trainer.steps=5"], "trainer.steps=5: evaluate takes KEY=VALUE"),
        (["inner.lr=abc"], "inner.lr=abc: not a value for inner.lr"),
        (["--ensemble", "4"], "--ensemble 4: "),
    ]:
        proc = maml_run(["evaluate", str(run), *bad], cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
