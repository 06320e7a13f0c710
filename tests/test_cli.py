"""The installed ``maml-run`` end to end, in subprocesses started outside the repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import DATA, QUICK, maml_run, needs_omniglot, read_metrics


def test_train_writes_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = maml_run(["task=sinusoid", "k=5", *QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    metrics = read_metrics(run_dir)
    test = metrics["meta_test"]
    assert test["inner_steps"] == list(range(11))
    assert len(test["query_loss"]["mean"]) == 11 and len(test["query_loss"]["ci95"]) == 11
    assert test["num_tasks"] == 20
    assert metrics["train"]["steps"] == 40 and metrics["k_shot"] == 5
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "adaptation.png").stat().st_size > 1000
    assert (run_dir / "tasks.png").stat().st_size > 1000
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "meta_train/query_loss" in r] == [10, 20, 30, 40]
    assert any("meta_val/query_loss" in r for r in history)
    assert "meta-test on 20 held-out tasks" in proc.stdout
    assert not (tmp_path / "outputs").exists(), "writes only into hydra.run.dir"


def test_python_dash_m_entry(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "maml_runner", "presets"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "experiment=finn17_sinusoid " in proc.stdout


def test_multirun_two_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    maml_run(["-m", "seed=0,1", *QUICK, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    a, b = (read_metrics(j) for j in jobs)
    assert {a["seed"], b["seed"]} == {0, 1}
    assert a["meta_test"]["query_loss"]["mean"] != b["meta_test"]["query_loss"]["mean"]
    assert (sweep / "multirun.yaml").is_file()


def test_wandb_offline_run_holds_the_logged_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in QUICK if not o.startswith("logger.")]
    maml_run([*overrides, "logger.mode=offline", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (
        b"meta_train/query_loss",
        b"meta_val/query_loss",
        b"meta_test/query_loss",
        b"plots/adaptation",
        b"meta_test/query_loss_step10",
        b"inner",
    ):
        assert key in data, key


def test_help_explains_both_forms(tmp_path: Path) -> None:
    out = maml_run(["--help"], cwd=tmp_path).stdout
    assert "maml-run task=sinusoid k=5" in out and "maml-run -m" in out
    for command in ("config", "presets", "evaluate", "table"):
        assert command in out


def test_config_and_presets_commands(tmp_path: Path) -> None:
    out = maml_run(["config", "experiment=finn17_sinusoid"], cwd=tmp_path).stdout
    assert "k_shot: 10" in out and "eval_k_shot: 5" in out
    presets = maml_run(["presets"], cwd=tmp_path).stdout
    assert "experiment=finn17_sinusoid_pretrain" in presets and "task=sinusoid" in presets


def test_evaluate_and_table_commands(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    maml_run([*QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    out = maml_run(["evaluate", str(run_dir), "--num-tasks", "30", "--seed", "7"], cwd=tmp_path)
    assert "meta-test on 30 held-out tasks" in out.stdout
    saved = json.loads(next((run_dir / "checkpoints").glob("eval_*seed7_n30.json")).read_text())
    assert saved["meta_test"]["num_tasks"] == 30
    table = maml_run(["table", str(tmp_path), "--plot", str(tmp_path / "all.png")], cwd=tmp_path)
    assert "query_loss @1 (ours)" in table.stdout and (tmp_path / "all.png").is_file()


BAD_INPUTS = [
    (
        ["task=nope"],
        "task=nope: unknown task; choose one of ant_dir, ant_vel, cheetah_dir, "
        "cheetah_vel, miniimagenet, nav2d, omniglot, sinusoid",
    ),
    (["model=resnet"], "model=resnet: unknown model"),
    (["experiment=finn99"], "experiment=finn99: unknown experiment; choose one of"),
    (["k=0"], "k=0: K (support examples per task) must be an integer >= 1"),
    (["trainer.meta_batch_size=0"], "trainer.meta_batch_size=0: must be an integer >= 1"),
    (["inner.lr=-0.1"], "inner.lr=-0.1: the inner step size must be >= 0"),
    (["outer.lr=-1"], "outer.lr=-1: the meta step size must be a number >= 0"),
    (["inner.steps=-2"], "inner.steps=-2: must be an integer >= 0"),
    (["device=cuda"], "device=cuda: no CUDA GPU is visible here"),
    (["device=tpu"], "device=tpu: choose auto, cpu, cuda or cuda:N"),
    (["logger.mode=loud"], "logger.mode=loud: choose one of online, offline, disabled"),
    (["resume=/no/such/run"], "resume=/no/such/run: no such run folder or checkpoint file"),
    (
        ["task=omniglot", "data.root=/no/such"],
        "data.root=/no/such: images_background.zip is missing",
    ),
    (
        ["task=omniglot", *DATA, "n_way=5000", "k=1"],
        "task.n_way=5000: omniglot/train has 1100 classes; choose n_way <= 1100",
    ),
    (
        ["task=omniglot", *DATA, "k=10"],
        "task.k_shot=10: task.k_shot + task.query_size = 25, but omniglot/train has 20 examples",
    ),
    (["model=conv4"], "model=conv4: needs image tasks"),
    # typos never run another experiment; Hydra's and the short knobs' errors are one line
    (["tsk=omniglot"], "tsk: no such config key; did you mean task?"),
    (["+tsk=omniglot"], "+tsk: no such config key; did you mean task?"),
    (["+trainer.stepz=10"], "+trainer.stepz: no such config key; did you mean trainer.steps?"),
    (["trainer.stepz=10"], "trainer.stepz: no such config key; did you mean trainer.steps?"),
    # suggested from the run's own config: a preset's keys, not the default (sinusoid, Adam) one's
    (
        ["experiment=finn17_nav2d", "outer.fvp_epz=1"],
        "outer.fvp_epz: no such config key; did you mean outer.fvp_eps?",
    ),
    (
        ["experiment=finn17_nav2d", "+task.robotz=1"],
        "+task.robotz: no such config key; did you mean task.robot?",
    ),
    (["k=abc"], "k=abc: K, support examples per task must be an integer"),
    (["k=1.5"], "k=1.5: K, support examples per task must be an integer"),
    (["seed=abc"], "seed=abc: seed must be an integer"),
    (["seed=1.5"], "seed=1.5: seed must be an integer"),
    (["n_way=abc"], "n_way=abc: N, classes per task must be an integer"),
    (["outer.lr=abc"], "outer.lr=abc: the meta step size must be a number >= 0"),
    (["inner.lr=abc"], "inner.lr=abc: must be a number"),
    (["trainer.meta_batch_size=0"], "trainer.meta_batch_size=0: must be an integer >= 1"),
    (["k=5,10"], "Ambiguous value for argument 'k=5,10'"),
    (
        ["trainer.tasks_per_pass=0"],
        "trainer.tasks_per_pass=0: give a number of tasks >= 1, or auto",
    ),
    (
        ["task=miniimagenet", "data.cache_dir=/no/such/cache"],
        "data.root=null: miniImageNet is not downloadable automatically",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the Omniglot cases that read the test data folder need the shared copy
        pytest.param(
            a, m, id=a[0], marks=needs_omniglot if "task=omniglot" in a and DATA[0] in a else ()
        )
        for a, m in BAD_INPUTS
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = maml_run([*QUICK, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()  # no folder


def test_a_mistyped_command_is_one_line(tmp_path: Path) -> None:
    proc = maml_run(["evalute", "RUN"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: evalute: not a command nor a key=value override; did you mean evaluate? "
        "(commands: train, config, presets, evaluate, table, sweep-results)"
    )


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    maml_run([*QUICK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    other = tmp_path / "other"
    proc = maml_run(
        [
            "model.hidden=[8]",
            f"resume={run_dir / 'checkpoints' / 'last.pt'}",
            *QUICK,
            f"hydra.run.dir={other}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "model differs" in proc.stderr and "0.bias" in proc.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:500])
    proc = maml_run([f"resume={bad}", *QUICK, f"hydra.run.dir={other}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@needs_omniglot
def test_omniglot_conv4_end_to_end(tmp_path: Path) -> None:
    """The real Omniglot set, conv4, a few meta-iterations: accuracy metrics reach metrics.json."""
    run_dir = tmp_path / "run"
    args = [
        "task=omniglot",
        "model=conv4",
        "k=1",
        "n_way=5",
        "inner.lr=0.4",
        "inner.eval_steps=2",
        "eval.report_steps=[0,1,2]",
        "trainer.meta_batch_size=2",
        "eval.batch_size=10",
    ]
    maml_run(
        [
            *QUICK,
            *DATA,
            *args,
            "trainer.steps=4",
            "trainer.val_every=0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    test = read_metrics(run_dir)["meta_test"]
    assert test["num_tasks"] == 20 and test["inner_steps"] == [0, 1, 2]
    acc = test["query_acc"]["mean"]
    assert all(0.0 <= a <= 1.0 for a in acc) and len(test["query_acc"]["ci95"]) == 3
    assert acc[2] > 0.3, "after 4 meta-iterations, two inner steps beat chance (0.2) on 5-way tasks"


def test_a_table_config_runs_its_cells_as_a_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    short = ["trainer.steps=20", "trainer.val_every=0", "eval.num_tasks=10", "trainer.log_every=10"]
    maml_run(
        [
            "table=finn17_sinusoid",
            *short,
            "logger.mode=disabled",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    runs = [read_metrics(p.parent) for p in sweep.glob("*/metrics.json")]
    assert sorted((r["experiment"], r["seed"]) for r in runs) == [
        (e, s) for e in ("finn17_sinusoid", "finn17_sinusoid_pretrain") for s in (0, 1, 2)
    ]
    out = maml_run(["table", str(sweep)], cwd=tmp_path).stdout
    assert out.count("| finn17_sinusoid") == 6 and "0.67" in out and "2.41" in out
