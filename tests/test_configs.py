"""Every option of every config group, and every preset, composes and builds.

Options are found by listing conf/, so a new preset is tested without editing this file. Every
composed config sets every key (the schemas in maml_runner/config.py hold types only, ``???``).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from omegaconf import MISSING, OmegaConf

from maml_runner.build import build
from maml_runner.cli import missing_plugin
from maml_runner.config import GROUP_SCHEMAS, SCHEMAS
from maml_runner.errors import UserError
from maml_runner.paths import conf_dir
from tests.helpers import make_config, skip_without_omniglot

CONF = conf_dir()
OPTIONS = [
    (group.name, path.stem)
    for group in sorted(p for p in CONF.iterdir() if p.is_dir())
    for path in sorted(group.glob("*.yaml"))
]

TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# RL task families (their schema is base_rl) go with the policy model; the TRPO outer steps go
# with them (a torch.optim outer step composes with any task)
RL_TASKS = [t for t in TASKS if "- base_rl" in (CONF / "task" / f"{t}.yaml").read_text()]
RL_PARTS = {"task": RL_TASKS, "model": ["gaussian_mlp"], "outer": ["trpo", "trpo_reference"]}
# options with a required key of the user's (``???`` in the file), and a value to test them with
REQUIRED = {"model=custom": ["model._target_=tests.nets.ResidualMLP"]}


def _companions(group: str, option: str) -> list[str]:
    """What an RL option needs beside it to build (the other two RL parts)."""
    if option not in RL_PARTS.get(group, []):
        return []
    defaults = {"task": "nav2d", "model": "gaussian_mlp", "outer": "trpo"}
    return [f"{g}={o}" for g, o in defaults.items() if g != group]


def _one_meta_step(cfg) -> None:
    """Build the config's job (tiny RL rollouts) and take one meta-step: finite figures and θ;
    a supervised meta-batch has the configured size and N·K support examples per task."""
    if "horizon" in cfg.task:  # RL: short episodes, few of them, in this process
        cfg.task.horizon, cfg.task.k_shot = 4, 2
        if cfg.task.workers is not None:  # MuJoCo robots
            cfg.task.workers = 1
    with build(cfg) as job:
        if "query_size" in cfg.task:
            batch = job.stream.batch(0)
            assert batch.num_tasks == cfg.trainer.meta_batch_size
            ways = cfg.task.get("n_way", 1)
            assert batch.support_x.shape[1] == ways * cfg.task.k_shot
        out = job.update(0)
        assert out.shape in ((), (len(job.metrics),)) and torch.isfinite(out).all()
        assert all(torch.isfinite(p).all() for p in job.params.values())


def test_options_are_found() -> None:
    groups = {g for g, _ in OPTIONS}
    assert {
        "task",
        "model",
        "algorithm",
        "inner",
        "outer",
        "trainer",
        "eval",
        "logger",
        "experiment",
        "debug",
    } <= groups
    assert ("experiment", "finn17_sinusoid") in OPTIONS


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group: str, option: str) -> None:
    package = missing_plugin(group, option)
    if package:
        pytest.skip(f"{group}={option} needs {package} (pip install 'maml-runner[sweeps]')")
    # Small meta-batches keep the conv presets fast; everything else is the option's own.
    base = [
        f"{group}={option}",
        "device=cpu",
        "eval.num_tasks=5",
        "trainer.val_tasks=5",
        "trainer.meta_batch_size=2",
    ]
    # A model option is built with the first task family it fits (image models need images).
    supervised = [t for t in TASKS if t not in RL_TASKS]
    tasks = supervised if group == "model" and not _companions(group, option) else [None]
    base += _companions(group, option) + REQUIRED.get(f"{group}={option}", [])
    for task in tasks:
        cfg = make_config(base + ([f"task={task}"] if task else []))
        if cfg.task.get("test_goals") == "reference":  # a fixed set of 40: the preset's own
            cfg.eval.num_tasks = 40
        assert not OmegaConf.missing_keys(cfg), "keys no YAML sets (their schema says ???)"
        OmegaConf.resolve(cfg)
        skip_without_omniglot(cfg)
        try:
            return _one_meta_step(cfg)
        except UserError:
            if task == tasks[-1]:
                raise


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_model_pair_builds_or_says_why_not(task: str, model: str) -> None:
    cfg = make_config(
        [
            f"task={task}",
            f"model={model}",
            "device=cpu",
            "eval.num_tasks=4",
            "trainer.val_tasks=4",
            "trainer.meta_batch_size=2",
            "k=1",
        ]
        + [c for c in _companions("task", task) if c.startswith("outer")]
        + REQUIRED.get(f"model={model}", [])
    )
    skip_without_omniglot(cfg)
    try:
        _one_meta_step(cfg)
    except UserError as err:
        # the message names the model family (model=conv4 for the option conv4_miniimagenet)
        named = f"model={model}" in str(err) or f"model={cfg.model.name}" in str(err)
        assert named and "\n" not in str(err)


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_opens_with_its_command_and_source(path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# maml-run experiment={path.stem}")
    assert lines[1] == f"# maml-run experiment={path.stem}" or " data.root=" in lines[1]
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "Finn" in header, "each preset cites the paper (or another source) in its header"


def test_short_knobs_reach_the_groups() -> None:
    cfg = make_config(["k=7", "seed=3"])
    assert cfg.task.k_shot == 7 and cfg.task.query_size == 7 and cfg.task.eval_k_shot == 7
    assert cfg.seed == 3


def test_paper_preset_pins_the_paper() -> None:
    cfg = make_config(["experiment=finn17_sinusoid"])
    assert (cfg.task.k_shot, cfg.task.eval_k_shot) == (10, 5)
    assert list(cfg.model.hidden) == [40, 40] and cfg.model.activation == "relu"
    assert (cfg.inner.lr, cfg.inner.steps, cfg.inner.first_order) == (0.01, 1, False)
    assert cfg.trainer.meta_batch_size == 25 and cfg.trainer.steps == 70_000
    assert cfg.outer._target_ == "torch.optim.Adam" and cfg.outer.lr == 0.001
    assert list(cfg.paper.mean) == [0.67, 0.38, 0.35]
    pre = make_config(["experiment=finn17_sinusoid_pretrain"])
    assert pre.algorithm.name == "pretrain" and list(pre.paper.mean) == [2.41, 2.23, 2.19]


@pytest.mark.parametrize("path", sorted((CONF / "table").glob("*.yaml")), ids=lambda p: p.stem)
def test_table_sweeps_existing_presets(path) -> None:
    table = OmegaConf.load(path)
    assert table.hydra.mode == "MULTIRUN"
    presets = str(table.hydra.sweeper.params.experiment).split(",")
    assert presets and all((CONF / "experiment" / f"{p}.yaml").is_file() for p in presets)
    assert path.read_text().splitlines()[1].startswith(f"# maml-run table={path.stem}")
    for preset in presets:  # each job of the table, as the multirun composes it
        job = make_config([f"table={path.stem}", f"experiment={preset}"])
        assert not OmegaConf.missing_keys(job), f"experiment={preset}: keys no YAML sets"


SCHEMA_CLASSES = [*SCHEMAS.values(), *(c for g in GROUP_SCHEMAS.values() for c in g.values())]


@pytest.mark.parametrize("schema", SCHEMA_CLASSES, ids=lambda c: c.__name__)
def test_schemas_hold_types_not_values(schema) -> None:
    """Values live in conf/ only: a default in a schema would be a second, dead copy."""
    for f in dataclasses.fields(schema):
        assert f.default is MISSING and f.default_factory is dataclasses.MISSING, f.name


SCHEMA_FILES = [
    p for p in sorted(CONF.glob("*/*.yaml")) if re.search(r"^  - base\w*$", p.read_text(), re.M)
]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_key_has_a_comment(path) -> None:
    """Each top-level key has a comment right above it, or in the comment above its run of keys
    when that comment names it (``# amplitude A ~ U[amplitude_min, amplitude_max]``)."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        key = re.match(r"^(\w+):", line)
        if not key or key[1] == "defaults":
            continue
        above = i - 1
        while above >= 0 and re.match(r"^\w+:", lines[above]):
            above -= 1
        comment = lines[above] if above >= 0 and lines[above].startswith("#") else ""
        assert comment and (above == i - 1 or key[1] in comment), f"{key[1]} has no comment"
