"""Config → Job. The only module that reads the config tree (the CLI's pre-checks aside).

``build(cfg)`` is the only place that tells an RL run from a supervised one. ``validate``
turns out-of-range values into one-line ``UserError`` messages that name the key, the value and
what is allowed; the builders then make the task family, model, learner, task stream, update,
outer optimiser and fixed task sets, and bind every setting a run needs into the ``Job``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import hydra.utils
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from maml_runner import distributed
from maml_runner.errors import InvalidArgument, UserError, is_number
from maml_runner.job import Job, Report, SupervisedJob
from maml_runner.maml import MAML, Pretrain, TaskLoss
from maml_runner.maml.batch_norm import MODES as BATCH_NORM_STATS
from maml_runner.maml.batch_norm import StepStatistics
from maml_runner.maml.core import check_inner
from maml_runner.maml.engine import engine_for, use_statistics
from maml_runner.maml.family import ANIL, MAMLpp, MetaSGD
from maml_runner.maml.reptile import Reptile
from maml_runner.models import MLP, Conv4, ResNet12
from maml_runner.tasks import FixedTasks, Sinusoid, TaskStream
from maml_runner.tasks.base import TaskFamily
from maml_runner.tasks.classification import ImageClasses
from maml_runner.tracking import NullTracker, Tracker
from maml_runner.trainer import (
    Cadence,
    announced,
    auto_tasks_per_pass,
    gradient_step,
    scheduled,
)

if TYPE_CHECKING:
    from maml_runner.rl.job import RLJob

ALGORITHMS = ("maml", "pretrain", "metasgd", "anil", "mamlpp", "reptile")
PER_STEP_ALGORITHMS = ("maml", "metasgd", "anil", "mamlpp")  # those with an inner loop of steps
SPLITS = ("paper", "background")
LOGGER_MODES = ("online", "offline", "disabled")
TEST_CHECKPOINTS = ("best", "last")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
TRPO_TARGET = "maml_runner.rl.trpo.TRPO"
FUSED_OPTIMIZERS = ("torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD")


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise UserError(f"{key}={value}: {allowed}")


def _positive(cfg: DictConfig, *keys: str, minimum: int = 1) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        _require(
            isinstance(value, int) and value >= minimum,
            key,
            value,
            f"must be an integer >= {minimum}",
        )


@contextmanager
def _keys(group: str, **keys: str) -> Iterator[None]:
    """Name a callee's bad parameter by its config key: ``keys[name]``, else ``group.name``.

    Constructors and loaders raise ``InvalidArgument`` naming their own parameter (Hydra's
    ``instantiate`` wraps it); this turns it into the one-line ``UserError`` for the user.
    """
    try:
        yield
    except Exception as exc:
        err = exc if isinstance(exc, InvalidArgument) else exc.__cause__
        if not isinstance(err, InvalidArgument):
            raise
        key = keys.get(err.name, f"{group}.{err.name}")
        value = "null" if err.value is None else err.value
        raise UserError(f"{key}={value}: {err.allowed}") from None


def _is_rl(cfg: DictConfig) -> bool:
    """RL task families (nav2d, MuJoCo locomotion) carry an ``env``; supervised ones do not."""
    return "env" in cfg.task


def _validate_common(cfg: DictConfig) -> None:
    if cfg.model.name != "custom" and "_target_" in cfg.model:
        raise UserError(
            f"model._target_={cfg.model._target_}: only model=custom takes a module of your own "
            f"(this run's model is {cfg.model.name}); add model=custom"
        )
    # (keys that a constructor takes are checked there: TaskStream, FixedTasks, MAML, ...)
    _positive(cfg, "trainer.log_every")
    _positive(cfg, "trainer.steps", "trainer.val_every", "trainer.checkpoint_every", minimum=0)
    _positive(cfg, "trainer.keep_best")
    _require(
        cfg.trainer.keep_best == 1 or cfg.trainer.val_every > 0,
        "trainer.keep_best",
        cfg.trainer.keep_best,
        "keeps the best validation steps, and this run never validates (trainer.val_every=0); "
        "set trainer.val_every > 0 or keep_best=1",
    )
    _positive(cfg, "inner.eval_steps", minimum=0)
    # torch.optim takes a bool as a learning rate (True: 1), so the outer one is checked here
    outer_lr = cfg.outer.get("lr")  # optional: TRPO and some torch.optim classes have none
    _require(
        outer_lr is None or (is_number(outer_lr) and outer_lr >= 0),
        "outer.lr",
        outer_lr,
        "the meta step size must be a number >= 0",
    )
    # checked again where they are used, and here so that a sweep refuses before its first job
    with _keys("inner", inner_lr="inner.lr", inner_steps="inner.steps"):
        check_inner(cfg.inner.lr, cfg.inner.steps)
    _positive(cfg, "trainer.meta_batch_size", "trainer.val_tasks", "eval.num_tasks")
    _positive(cfg, "eval.batch_size")
    tasks = cfg.eval.num_tasks
    _require(
        isinstance(tasks, int) and tasks >= 2,
        "eval.num_tasks",
        tasks,
        "a mean ± 95% CI over test tasks needs at least 2 (the paper uses 600)",
    )
    which = cfg.eval.checkpoint
    _require(
        which in TEST_CHECKPOINTS,
        "eval.checkpoint",
        which,
        f"choose one of {', '.join(TEST_CHECKPOINTS)}",
    )
    if HydraConfig.initialized() and cfg.trainer.val_every == 0:
        sweeper = OmegaConf.select(HydraConfig.get(), "sweeper._target_")
        _require(
            sweeper in (None, BASIC_SWEEPER),
            "trainer.val_every",
            0,
            f"a search ({sweeper}) is told the validation metric, so it needs validation: "
            "set trainer.val_every > 0",
        )
    _positive(cfg, "eval.plot_tasks", minimum=0)
    bad_steps = [s for s in cfg.eval.report_steps if not 0 <= s <= cfg.inner.eval_steps]
    _require(
        not bad_steps,
        "eval.report_steps",
        list(cfg.eval.report_steps),
        f"steps must lie in 0..inner.eval_steps ({cfg.inner.eval_steps})",
    )
    name = cfg.algorithm.name
    _require(name in ALGORITHMS, "algorithm.name", name, f"choose one of {', '.join(ALGORITHMS)}")
    mode = cfg.logger.mode
    _require(mode in LOGGER_MODES, "logger.mode", mode, f"choose one of {', '.join(LOGGER_MODES)}")
    resolve_device(cfg.device)


def validate_rl(cfg: DictConfig) -> None:
    """``validate`` for RL task families: the policy model goes with them (the outer optimiser:
    TRPO, or any ``torch.optim`` class, checked as it is built)."""
    _validate_common(cfg)
    t = cfg.task
    _positive(cfg, "task.eval_k_shot", "trainer.val_tasks")  # (the rest: the constructors)
    _require(
        cfg.model.name == "gaussian_mlp",
        "model",
        cfg.model.name,
        f"task={t.name} needs model=gaussian_mlp, with outer=trpo (the paper's) or a torch.optim "
        f"class (or experiment=finn17_{t.name})",
    )
    name = cfg.algorithm.name
    _require(
        name in ("maml", "pretrain"),
        "algorithm",
        name,
        f"RL tasks (task={t.name}) run maml or pretrain; {name} is for supervised tasks",
    )
    if t.env == "nav2d":
        _require(t.goal == "position", "task.goal", t.goal, "nav2d tasks are goal positions")
    _validate_robot_keys(t)
    from maml_runner.rl.envs import REFERENCE_GOAL_RANGE, REFERENCE_GOALS, TEST_GOALS, check_robot

    if t.env != "nav2d":
        with _keys("task"):
            check_robot(t.robot, t.env, OmegaConf.to_container(t.env_kwargs))

    goals = t.test_goals
    _require(
        goals in TEST_GOALS, "task.test_goals", goals, f"choose one of {', '.join(TEST_GOALS)}"
    )
    if goals == "reference":
        _require(
            t.env == "nav2d",
            "task.test_goals",
            goals,
            f"the reference goals are nav2d's (task={t.name}); choose sampled",
        )
        _require(
            (t.goal_low, t.goal_high) == REFERENCE_GOAL_RANGE,
            "task.test_goals",
            goals,
            f"the reference goals lie in [{REFERENCE_GOAL_RANGE[0]}, {REFERENCE_GOAL_RANGE[1]}]², "
            f"not task.goal_low/goal_high [{t.goal_low}, {t.goal_high}]; choose sampled",
        )
        _require(
            cfg.eval.num_tasks == REFERENCE_GOALS,
            "eval.num_tasks",
            cfg.eval.num_tasks,
            f"task.test_goals=reference is the reference code's {REFERENCE_GOALS} goals; "
            f"set eval.num_tasks={REFERENCE_GOALS}, or task.test_goals=sampled",
        )
    scale = t.eval_later_lr_scale  # a float by the schema
    _require(
        scale > 0,
        "task.eval_later_lr_scale",
        scale,
        "give a number > 0 (the meta-test's steps after the first use α times it; 1: all α)",
    )


# task keys only one kind of robot has (null in the other's task files)
NAV2D_ONLY = ("reward", "action_bound", "goal_radius", "action_map", "goal_shape")
MUJOCO_ONLY = ("env_kwargs", "workers", "robot")
GOAL_RANGE = ("goal_low", "goal_high")  # position and velocity goals; direction goals are ±1


def unused_task_keys(t: DictConfig) -> tuple[str, ...]:
    """The RL task keys this task's robot and goal do not read (they must be None)."""
    nav2d = t.env == "nav2d"
    return (MUJOCO_ONLY if nav2d else NAV2D_ONLY) + (() if t.goal != "direction" else GOAL_RANGE)


def _validate_robot_keys(t: DictConfig) -> None:
    """Refuse a key this task's robot would ignore, and ask for one it needs."""
    unused = unused_task_keys(t)
    for key in unused:
        value = t[key]
        if key == "env_kwargs" and not value:
            continue  # {}: nothing passed
        if key in GOAL_RANGE:
            why = "direction goals are ±1 (goal_low/goal_high bound velocity and position goals)"
        elif t.env == "nav2d":
            why = "it is for the gymnasium MuJoCo robots; nav2d is a torch point robot"
        else:
            why = f"it is for nav2d's point robot; task={t.name} runs {t.env}"
        shown = OmegaConf.to_container(value) if key == "env_kwargs" else value
        _require(value is None, f"task.{key}", shown, f"task={t.name} would ignore it: {why}")
    for key in NAV2D_ONLY + MUJOCO_ONLY + GOAL_RANGE:
        if key not in unused:
            _require(t[key] is not None, f"task.{key}", "null", f"task={t.name} needs a value")


def validate(cfg: DictConfig) -> None:
    """Check ranges and choices the schemas cannot express; raise ``UserError`` on the first."""
    if _is_rl(cfg):
        return validate_rl(cfg)
    _validate_common(cfg)
    _require(cfg.k >= 1, "k", cfg.k, "K (support examples per task) must be an integer >= 1")
    per_pass = cfg.trainer.tasks_per_pass
    _require(
        per_pass == "auto" or (type(per_pass) is int and per_pass >= 1),
        "trainer.tasks_per_pass",
        per_pass,
        "give a number of tasks >= 1, or auto",
    )
    _require(
        cfg.model.name != "gaussian_mlp" and cfg.outer._target_ != TRPO_TARGET,
        "model" if cfg.model.name == "gaussian_mlp" else "outer",
        cfg.model.name if cfg.model.name == "gaussian_mlp" else cfg.outer._target_,
        "the Gaussian policy and TRPO are for RL tasks (nav2d, cheetah_dir, ...)",
    )
    if cfg.task.name == "omniglot":
        split = cfg.task.split
        _require(split in SPLITS, "task.split", split, f"choose one of {', '.join(SPLITS)}")
    _validate_batch_norm_stats(cfg)


def _validate_batch_norm_stats(cfg: DictConfig) -> None:
    """``model.batch_norm_stats``: one of ``BATCH_NORM_STATS``; ``per_step`` only where it can
    be honoured (an algorithm with inner steps, one process). The model is checked once built."""
    if "batch_norm_stats" not in cfg.model:  # gaussian_mlp (RL): no batch norm
        return
    mode, key = cfg.model.batch_norm_stats, "model.batch_norm_stats"
    _require(mode in BATCH_NORM_STATS, key, mode, f"choose one of {', '.join(BATCH_NORM_STATS)}")
    if mode != "per_step":
        return
    name = cfg.algorithm.name
    why = {
        "reptile": "Reptile has its own batch-norm choice at meta-test, algorithm.transductive",
        "pretrain": "the pretrained baseline takes no inner steps to keep statistics of",
    }
    _require(
        name in PER_STEP_ALGORITHMS,
        key,
        mode,
        f"not with algorithm={name} ({why.get(name, 'no inner loop')}); per_step works with "
        f"algorithm {', '.join(PER_STEP_ALGORITHMS)}, transductive with all",
    )
    _require(
        not distributed.launched(),
        key,
        mode,
        "not under torchrun (each rank would update the statistics from its own tasks alone); "
        "run it in one process, or choose transductive",
    )


def per_step_statistics(cfg: DictConfig, model: nn.Module) -> StepStatistics | None:
    """``model.batch_norm_stats=per_step``: the model's per-step batch-norm statistics, given to
    its engine; None for transductive. Refuses a model that cannot keep them."""
    if "batch_norm_stats" not in cfg.model or cfg.model.batch_norm_stats != "per_step":
        return None  # (gaussian_mlp has no such key)
    try:
        statistics = StepStatistics(model, cfg.inner.steps)
    except ValueError as err:
        allowed = "choose transductive, or a model with batch norm"
        if cfg.model.name == "mlp":
            allowed += " (model.batch_norm=true)"
        elif cfg.model.name in ("conv4", "resnet12"):
            allowed += " (model.norm=batch)"
        raise UserError(
            f"model.batch_norm_stats=per_step: {err} (model={cfg.model.name}, "
            f"{type(model).__name__}); {allowed}"
        ) from None
    use_statistics(model, statistics)
    return statistics


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; refuse a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name}: no CUDA GPU is visible here; use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device={name}: only {torch.cuda.device_count()} GPU(s); "
                f"choose cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise UserError(f"device={name}: choose auto, cpu, cuda or cuda:N")
    return device


def build_families(cfg: DictConfig, device: torch.device) -> dict[str, TaskFamily]:
    """The task family of each split: ``{"train", "val", "test"}``."""
    task = cfg.task
    if task.name == "sinusoid":
        with _keys("task"):
            family = Sinusoid(
                amplitude_min=task.amplitude_min,
                amplitude_max=task.amplitude_max,
                phase_min=task.phase_min,
                phase_max=task.phase_max,
                x_min=task.x_min,
                x_max=task.x_max,
            )
        return {"train": family, "val": family, "test": family}
    if task.name == "omniglot":
        from maml_runner.data import omniglot

        with _keys("task", root="data.root", download="data.download"):
            data = omniglot.load_omniglot(
                None if cfg.data.root is None else Path(cfg.data.root).expanduser(),
                cache_dir=Path(cfg.data.cache_dir).expanduser(),
                download=cfg.data.download,
                image_size=task.image_size,
                resample=task.resample,
            )
        if task.split == "paper":
            splits = omniglot.paper_split(data.num_characters, seed=task.split_seed)
        else:
            splits = omniglot.background_split(data)
        images = data.images.unsqueeze(2).to(device)  # [characters, 20, 1, S, S] uint8
        families = {}
        for split, index in splits.items():
            families[split] = _image_classes(
                images[index.to(device)], task, task.rotations, f"omniglot/{split}"
            )
        return families
    if task.name == "miniimagenet":
        from maml_runner.data.miniimagenet import load_miniimagenet

        cache_dir = Path(cfg.data.cache_dir).expanduser()
        root = cfg.data.root
        if root is None and (cache_dir / "miniimagenet").is_dir():
            root = cache_dir / "miniimagenet"
        with _keys("task", root="data.root"):
            splits = load_miniimagenet(
                None if root is None else Path(root).expanduser(),
                cache_dir=cache_dir,
                image_size=task.image_size,
            )
        return {
            split: _image_classes(images.to(device), task, False, f"miniimagenet/{split}")
            for split, images in splits.items()
        }
    raise UserError(f"task.name={task.name}: choose one of sinusoid, omniglot, miniimagenet")


def _image_classes(images: torch.Tensor, task: DictConfig, rotations: bool, name: str):
    """One split's ``ImageClasses``, refusing N or K+Q that the split cannot supply."""
    with _keys("task"):
        family = ImageClasses(images, task.n_way, rotations, name)
    for shot, query in (("k_shot", "query_size"), ("eval_k_shot", "eval_query_size")):
        total = task[shot] + task[query]
        if total > family.examples_per_class:
            raise UserError(
                f"task.{shot}={task[shot]}: task.{shot} + task.{query} = {total}, but {name} "
                f"has {family.examples_per_class} examples per class; lower one of them"
            )
    return family


def build_model(model: DictConfig, family: TaskFamily) -> nn.Module:
    """The model of ``model`` for ``family``'s inputs and outputs (any ``nn.Module``).

    Its engine is chosen here, once: the batched layers when they cover every module, else the
    torch.func path (``maml.engine``); ``engine_for(net).description`` says which and why.
    """
    with _keys("model"):
        net = _model(model, family)
    engine_for(net)
    return net


def _model(model: DictConfig, family: TaskFamily) -> nn.Module:
    shape, outputs = family.input_shape, family.output_size
    if model.name == "mlp":
        return MLP(
            in_features=math.prod(shape),
            out_features=outputs,
            hidden=list(model.hidden),
            activation=model.activation,
            init=model.init,
            batch_norm=model.batch_norm,
            flatten=len(shape) > 1,
        )
    elif model.name == "conv4":
        if len(shape) != 3:
            raise UserError(f"model=conv4: needs image tasks, but the task's inputs are {shape}")
        return Conv4(
            in_channels=shape[0],
            image_size=shape[1],
            num_classes=outputs,
            filters=model.filters,
            blocks=model.blocks,
            downsample=model.downsample,
            head=model.head,
            norm=model.norm,
            norm_groups=model.norm_groups,
        )
    elif model.name == "resnet12":
        if len(shape) != 3:
            raise UserError(f"model=resnet12: needs image tasks, but the task's inputs are {shape}")
        return ResNet12(
            in_channels=shape[0],
            image_size=shape[1],
            num_classes=outputs,
            widths=list(model.widths),
            norm=model.norm,
            norm_groups=model.norm_groups,
            dropout=model.dropout,
        )
    elif model.name == "custom":
        return _custom_model(model, list(shape), outputs)
    raise UserError(f"model.name={model.name}: choose one of mlp, conv4, resnet12, custom")


TASK_ARGUMENTS = ("input_shape", "num_outputs")


def _custom_model(model: DictConfig, input_shape: list[int], num_outputs: int) -> nn.Module:
    """``model=custom``: import ``model._target_`` and call it with the other keys as kwargs.

    The task's ``input_shape`` and ``num_outputs`` are passed too when the callable accepts them
    (a key of the same name in the config wins); see ``conf/model/custom.yaml``.
    """
    if OmegaConf.is_missing(model, "_target_"):
        raise UserError(
            "model._target_=???: model=custom needs the import path of your nn.Module, "
            "e.g. model._target_=mypkg.nets.MyNet"
        )
    target = model._target_
    kwargs = OmegaConf.to_container(model, resolve=True)
    del kwargs["name"], kwargs["_target_"], kwargs["batch_norm_stats"]  # build's, not the module's
    try:
        make = hydra.utils.get_object(target)
    except Exception as exc:  # Hydra: "Error loading 'x':" and the cause on the next line
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        reason = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"model._target_={target}: cannot import it ({reason}); the module must be "
            f"importable from this Python (pip install it, or set PYTHONPATH)"
        ) from None
    if not callable(make):
        raise UserError(
            f"model._target_={target}: not an nn.Module class (a {type(make).__name__})"
        )
    try:
        accepts = inspect.signature(make).parameters
    except (TypeError, ValueError):
        accepts = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepts.values())
    given = dict(input_shape=input_shape, num_outputs=num_outputs)
    for name in TASK_ARGUMENTS:
        if (takes_any or name in accepts) and name not in kwargs:
            kwargs[name] = given[name]
    try:
        net = make(**kwargs)
    except (InvalidArgument, UserError):
        raise
    except Exception as exc:
        args = ", ".join(kwargs) or "none"
        raise UserError(
            f"model._target_={target}: cannot build it with arguments {args} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(net, nn.Module):
        raise UserError(
            f"model._target_={target}: gave a {type(net).__name__}, not an nn.Module; "
            f"name an nn.Module class or a function returning one"
        )
    return net


def build_learner(
    cfg: DictConfig, model: nn.Module, task_loss: TaskLoss
) -> MAML | Pretrain | MetaSGD | ANIL | MAMLpp | Reptile:
    """The algorithm's learner over ``model`` (its own meta-parameters, if any, drawn from the
    global RNG after the model's and placed on the model's device)."""
    a, inner = cfg.algorithm, cfg.inner
    common = dict(inner_steps=inner.steps, first_order=inner.first_order)
    keys = dict(inner_lr="inner.lr", inner_steps="inner.steps", first_order="inner.first_order")
    with _keys("algorithm", **keys):
        if a.name == "reptile":
            return Reptile(
                model,
                task_loss,
                inner_lr=inner.lr,
                inner_steps=inner.steps,
                inner_batch_size=a.inner_batch_size,
                eval_batch_size=a.eval_batch_size,
                optimizer=a.inner_optimizer,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_eps,
                transductive=a.transductive,
                eval_seed=cfg.eval.seed,
            )
        if a.name == "pretrain":
            return Pretrain(model, task_loss, inner_lr=inner.lr)
        if a.name == "metasgd":
            return MetaSGD(model, task_loss, lr_init=list(a.lr_init), **common)
        if a.name == "anil":
            head = None if a.head is None else list(a.head)
            return ANIL(model, task_loss, inner_lr=inner.lr, head=head, **common)
        if a.name == "mamlpp":
            flags = dict(msl=a.msl, msl_epochs=a.msl_epochs, da_epochs=a.da_epochs, lslr=a.lslr)
            return MAMLpp(
                model,
                task_loss,
                inner_lr=inner.lr,
                bnwb=a.bnwb,
                epoch_length=a.epoch_length,
                **flags,
                **common,
            )
        return MAML(model, task_loss, inner_lr=inner.lr, **common)


def build_optimizer(
    outer: DictConfig, model: nn.Module, learned: nn.Module | None = None
) -> torch.optim.Optimizer:
    """Instantiate ``outer._target_`` (any ``torch.optim`` class) over the model's parameters
    and the learner's own meta-parameters (``learned``: Meta-SGD's α, MAML++'s rates)."""
    kwargs = {}
    if not {"foreach", "fused"} & set(outer) and outer._target_ in FUSED_OPTIMIZERS:
        # One fused kernel per update instead of ~10 multi-tensor ops: ~100 µs less per
        # meta-step on CPU, where an MLP meta-step costs ~1.8 ms in all.
        kwargs["fused"] = True
    settings = {k: v for k, v in outer.items() if k != "scheduler"}  # the schedule: below
    try:
        params = [*model.parameters(), *(learned.parameters() if learned is not None else [])]
        optimizer = hydra.utils.instantiate(settings, params=params, **kwargs)
    except Exception as exc:  # Hydra wraps import and argument errors
        cause = exc.__cause__ or exc
        raise UserError(f"outer._target_={outer._target_}: cannot build it ({cause})") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"outer._target_={outer._target_}: not a torch.optim.Optimizer class")
    return optimizer


def build_scheduler(outer: DictConfig, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """``outer.scheduler``: any ``torch.optim.lr_scheduler`` class by ``_target_`` over the outer
    optimiser, stepped once per meta-iteration; ``null``: a constant outer learning rate."""
    spec = outer.get("scheduler")  # the key is optional: RL's TRPO has no learning rate
    if spec is None:
        return None
    target = spec.get("_target_")
    try:
        scheduler = hydra.utils.instantiate(spec, optimizer=optimizer)
    except Exception as exc:  # Hydra wraps import and argument errors
        cause = exc.__cause__ or exc
        raise UserError(f"outer.scheduler._target_={target}: cannot build it ({cause})") from None
    if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, ReduceLROnPlateau):
        raise UserError(
            f"outer.scheduler._target_={target}: not a step-wise torch.optim.lr_scheduler class "
            f"(ReduceLROnPlateau needs a metric); choose e.g. "
            f"torch.optim.lr_scheduler.CosineAnnealingLR or LinearLR"
        )
    return scheduler


def build(cfg: DictConfig) -> Job:
    """Validate ``cfg`` and build its job (model weights from the global RNG).

    The only place that tells an RL run from a supervised one.
    """
    if _is_rl(cfg):
        return _build_rl(cfg)
    return _build_supervised(cfg)


def _cadence(cfg: DictConfig) -> Cadence:
    t = cfg.trainer
    return Cadence(
        steps=t.steps,
        val_every=t.val_every,
        checkpoint_every=t.checkpoint_every,
        log_every=t.log_every,
        progress=t.progress and distributed.is_lead(),
    )


def _report(cfg: DictConfig) -> Report:
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    header = {
        "experiment": choices.get("experiment"),
        "task": cfg.task.name,
        "algorithm": cfg.algorithm.name,
        # Reptile is first order by construction (inner.first_order does not apply)
        "first_order": cfg.inner.first_order or cfg.algorithm.name == "reptile",
        "k_shot": cfg.task.k_shot,
        "eval_k_shot": cfg.task.eval_k_shot,
        "seed": cfg.seed,
    }
    paper = OmegaConf.to_container(cfg.paper) if cfg.paper else None
    return Report(header, paper, list(cfg.eval.report_steps), cfg.algorithm.name)


def _num_threads(cfg: DictConfig, model: nn.Module) -> int | None:
    """``trainer.num_threads``; auto: 1 without convolutions, else torch's default (None)."""
    threads = cfg.trainer.num_threads
    if threads == "auto":
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        return None if convolutional else 1
    ok = threads is None or (type(threads) is int and threads >= 1)
    _require(ok, "trainer.num_threads", threads, "give an integer >= 1, null or auto")
    return threads


def _common(cfg: DictConfig, model: nn.Module) -> dict:
    """The Job fields every kind of run reads the same way."""
    return dict(
        num_threads=_num_threads(cfg, model),
        cadence=_cadence(cfg),
        report=_report(cfg),
        test_checkpoint=cfg.eval.checkpoint,
        keep_best=cfg.trainer.keep_best,
        resume=cfg.resume or None,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _tasks_per_pass(cfg: DictConfig, model: nn.Module, stream: TaskStream) -> int:
    """Resolve ``trainer.tasks_per_pass`` (``auto`` looks at one meta-batch) and say it."""
    per_pass = cfg.trainer.tasks_per_pass
    if per_pass == "auto":
        per_pass = auto_tasks_per_pass(model, stream.batch(0))
    size = cfg.trainer.meta_batch_size
    if per_pass < size and distributed.is_lead():
        how = f"auto on {stream.device.type}" if cfg.trainer.tasks_per_pass == "auto" else "set"
        Console().print(
            f"meta-batch of {size} tasks in passes of {per_pass} "
            f"(trainer.tasks_per_pass: {how}; same meta-gradient)"
        )
    return per_pass


def _build_supervised(cfg: DictConfig) -> SupervisedJob:
    distributed.init_from_env()
    validate(cfg)
    device = resolve_device(cfg.device)
    families = build_families(cfg, device)
    family = families["train"]
    model = build_model(cfg.model, family).to(device)
    if distributed.is_lead():
        Console().print(engine_for(model).description)
    learner = build_learner(cfg, model, family.task_loss)
    statistics = per_step_statistics(cfg, model)
    if statistics is not None:  # BNRS: checkpointed with the learner's own (learned.bn_stats.*)
        learner.learned.add_module("bn_stats", statistics)
    optimizer = build_optimizer(cfg.outer, model, learner.learned)
    params = dict(model.named_parameters())
    with _keys("task", meta_batch_size="trainer.meta_batch_size"):
        stream = TaskStream(
            family,
            meta_batch_size=cfg.trainer.meta_batch_size,
            k_shot=cfg.task.k_shot,
            query_size=cfg.task.query_size,
            seed=cfg.seed,
            device=device,
            # tiny tasks (regression): draw 100 meta-batches per call; images: one at a time
            chunk=100 if family.small else 1,
        )
    if isinstance(learner, Reptile):  # its meta-batches carry each task's minibatch order
        stream = learner.ordered(stream)
    fixed = dict(
        k_shot=cfg.task.eval_k_shot,
        query_size=cfg.task.eval_query_size,
        device=device,
        chunk=cfg.eval.batch_size,
        keep=family.small,
    )
    fixed_keys = dict(k_shot="task.eval_k_shot", query_size="task.eval_query_size")
    val_tasks = None
    if cfg.trainer.val_every > 0 and distributed.is_lead():  # rank 0 alone validates
        with _keys("eval", num_tasks="trainer.val_tasks", chunk="eval.batch_size", **fixed_keys):
            val_tasks = FixedTasks(
                families["val"], num_tasks=cfg.trainer.val_tasks, seed=cfg.trainer.val_seed, **fixed
            )
    with _keys("eval", chunk="eval.batch_size", **fixed_keys):
        test_tasks = FixedTasks(
            families["test"], num_tasks=cfg.eval.num_tasks, seed=cfg.eval.seed, **fixed
        )
    per_pass = _tasks_per_pass(cfg, model, stream)
    update, stop = gradient_step(learner, params, optimizer, stream, per_pass), None
    if distributed.world_size() > 1:
        update = distributed.DistributedStep(learner, params, optimizer, stream, per_pass)
        stop = update.stop
    if isinstance(learner, MAMLpp):  # its MSL and DA schedules follow the meta-iteration
        update = announced(update, learner.at_iteration)
    metrics = ("meta_train/query_loss",)
    scheduler = build_scheduler(cfg.outer, optimizer)
    if scheduler is not None:
        update, metrics = scheduled(update, scheduler), (*metrics, "meta_train/outer_lr")
    return SupervisedJob(
        model=model,
        params=params,
        learned=learner.learned,
        optimizer=optimizer,
        learner=learner,
        stream=stream,
        scheduler=scheduler,
        update=update,
        metrics=metrics,
        stop=stop,
        validation=None,
        device=device,
        family=families["test"],
        val_tasks=val_tasks,
        test_tasks=test_tasks,
        eval_steps=cfg.inner.eval_steps,
        plot_tasks=cfg.eval.plot_tasks,
        **_common(cfg, model),
    )


def _build_rl(cfg: DictConfig) -> RLJob:
    """An RL run (policy weights from the global RNG); CPU only."""
    from maml_runner.models import GaussianPolicy
    from maml_runner.rl.envs import Locomotion, Nav2D, reference_goals
    from maml_runner.rl.job import RLJob
    from maml_runner.rl.meta import (
        METRICS,
        OPTIMIZER_METRICS,
        MetaRL,
        RLTaskStream,
        outer_optimizer_step,
        trpo_step,
    )
    from maml_runner.tasks.base import make_generator

    if distributed.launched():
        raise UserError(
            f"task={cfg.task.name}: RL runs do not split over torchrun ranks; run it with "
            f"maml-run (its environments already step in task.workers processes)"
        )
    validate_rl(cfg)
    device = torch.device("cpu")  # rollouts step CPU simulators; the policies are small
    t = cfg.task
    if t.env == "nav2d":
        with _keys("task"):
            env = Nav2D(
                goal_low=t.goal_low,
                goal_high=t.goal_high,
                action_bound=t.action_bound,
                goal_radius=t.goal_radius,
                reward=t.reward,
                action_map=t.action_map,
                goal_shape=t.goal_shape,
            )
    else:
        try:
            with _keys("task"):
                env = Locomotion(
                    t.env,
                    goal=t.goal,
                    **{k: t[k] for k in GOAL_RANGE if t[k] is not None},
                    env_kwargs=OmegaConf.to_container(t.env_kwargs),
                    workers=t.workers,
                    robot=t.robot,
                )
        except UserError:
            raise
        except ImportError as err:
            raise UserError(f"task.env={t.env}: {err}") from None
        except Exception as err:  # gymnasium: unknown id or keyword
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            kwargs = dict(t.env_kwargs)
            raise UserError(f"task.env={t.env} (env_kwargs {kwargs}): {reason}") from None
    try:
        m = cfg.model
        with _keys("model"):
            policy = GaussianPolicy(
                env.obs_dim,
                env.act_dim,
                hidden=list(m.hidden),
                activation=m.activation,
                init_std=m.init_std,
                init=m.init,
            )
        initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        trpo, optimizer, scheduler = None, None, None  # TRPO keeps no state between steps
        if cfg.outer._target_ == TRPO_TARGET:
            with _keys("outer"):
                trpo = hydra.utils.instantiate(cfg.outer, params=list(policy.parameters()))
        else:  # any torch.optim class: one full-batch step on the outer objective per iteration
            optimizer = build_optimizer(cfg.outer, policy)
            scheduler = build_scheduler(cfg.outer, optimizer)
        rl_keys = dict(
            inner_lr="inner.lr", inner_steps="inner.steps", episodes_per_task="task.k_shot"
        )
        with _keys("task", **rl_keys):
            learner = MetaRL(
                env,
                policy,
                inner_lr=cfg.inner.lr,
                inner_steps=0 if cfg.algorithm.name == "pretrain" else cfg.inner.steps,
                first_order=cfg.inner.first_order,
                episodes_per_task=t.k_shot,
                horizon=t.horizon,
                discount=t.discount,
                normalize_advantages=t.normalize_advantages,
                sampling=t.sampling,
            )
        with _keys("trainer"):
            stream = RLTaskStream(env, meta_batch_size=cfg.trainer.meta_batch_size, seed=cfg.seed)
        val = env.sample_tasks(cfg.trainer.val_tasks, make_generator(cfg.trainer.val_seed, device))
        if t.test_goals == "reference":
            test = reference_goals()
        else:
            test = env.sample_tasks(cfg.eval.num_tasks, make_generator(cfg.eval.seed, device))
    except BaseException:
        env.close()
        raise
    if trpo is not None:
        update, metrics = trpo_step(learner, trpo, stream), METRICS
    else:
        update, metrics = outer_optimizer_step(learner, optimizer, stream), OPTIMIZER_METRICS
    if scheduler is not None:
        update, metrics = scheduled(update, scheduler), (*metrics, "meta_train/outer_lr")
    return RLJob(
        model=policy,
        params=learner.params,
        optimizer=optimizer,
        scheduler=scheduler,
        learner=learner,
        stream=stream,
        update=update,
        metrics=metrics,
        stop=None,
        validation=None,
        device=device,
        env=env,
        initial_state=initial,
        val_tasks=val,
        test_tasks=test,
        inner_lr=cfg.inner.lr,
        eval_k_shot=t.eval_k_shot,
        eval_steps=cfg.inner.eval_steps,
        later_lr_scale=t.eval_later_lr_scale,
        val_seed=cfg.trainer.val_seed,
        test_seed=cfg.eval.seed,
        validate_every=cfg.trainer.val_every > 0,
        plot_tasks=cfg.eval.plot_tasks,
        **_common(cfg, policy),
    )


def build_tracker(
    cfg: DictConfig, run_dir: Path, config: dict, run_id: str | None, multirun: bool
) -> Tracker | NullTracker:
    """The run's W&B run and JSONL history (rank 0 only; the others get a NullTracker).

    In a multirun the sweep folder's name groups the jobs, each named ``group/N``.
    """
    if not distributed.is_lead():
        return NullTracker()
    group = cfg.logger.group
    if group is None and multirun:
        group = Path(HydraConfig.get().sweep.dir).name
    return Tracker(
        run_dir,
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=group,
        tags=list(cfg.logger.tags),
        config=config,
        run_id=run_id,
        name=None if not multirun else f"{group}/{HydraConfig.get().job.num}",
    )
