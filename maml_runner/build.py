"""Config → objects. The only module besides ``app`` and ``cli`` that reads the config tree.

``validate`` turns out-of-range values into one-line ``UserError`` messages that name the key,
the value and what is allowed; ``build`` then makes the task family, model, learner, outer
optimiser and task sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maml_runner.errors import UserError
from maml_runner.maml import MAML, Pretrain, TaskLoss, regression_loss
from maml_runner.maml.functional import check_supported
from maml_runner.models import MLP
from maml_runner.models.mlp import ACTIVATIONS, INITS
from maml_runner.tasks import FixedTasks, Sinusoid, TaskStream

ALGORITHMS = ("maml", "pretrain")
LOGGER_MODES = ("online", "offline", "disabled")


@dataclass
class Experiment:
    """Everything a run needs, built from one config."""

    device: torch.device
    family: Sinusoid
    model: nn.Module
    task_loss: TaskLoss
    learner: MAML | Pretrain
    stream: TaskStream
    val_tasks: FixedTasks | None
    test_tasks: FixedTasks


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


def validate(cfg: DictConfig) -> None:
    """Check ranges and choices the schemas cannot express; raise ``UserError`` on the first."""
    _require(cfg.k >= 1, "k", cfg.k, "K (support examples per task) must be an integer >= 1")
    _positive(cfg, "task.k_shot", "task.query_size", "task.eval_k_shot", "task.eval_query_size")
    _positive(cfg, "trainer.meta_batch_size", "trainer.log_every", "trainer.val_tasks")
    _positive(cfg, "trainer.steps", "trainer.val_every", "trainer.checkpoint_every", minimum=0)
    _positive(cfg, "inner.steps", "inner.eval_steps", minimum=0)
    _positive(cfg, "eval.num_tasks", "eval.batch_size")
    _positive(cfg, "eval.plot_tasks", minimum=0)
    _require(cfg.inner.lr >= 0, "inner.lr", cfg.inner.lr, "the inner step size must be >= 0")
    outer_lr = cfg.outer.get("lr")  # optional: some torch.optim classes have no lr
    _require(
        outer_lr is None or outer_lr >= 0, "outer.lr", outer_lr, "the meta step size must be >= 0"
    )
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
    if cfg.task.name == "sinusoid":
        t = cfg.task
        _require(
            0 <= t.amplitude_min <= t.amplitude_max,
            "task.amplitude_min",
            t.amplitude_min,
            f"need 0 <= amplitude_min <= amplitude_max ({t.amplitude_max})",
        )
        _require(t.phase_min <= t.phase_max, "task.phase_min", t.phase_min, "need <= phase_max")
        _require(t.x_min < t.x_max, "task.x_min", t.x_min, f"need < task.x_max ({t.x_max})")
    if cfg.model.name == "mlp":
        m = cfg.model
        _require(
            m.activation in ACTIVATIONS,
            "model.activation",
            m.activation,
            f"choose one of {', '.join(ACTIVATIONS)}",
        )
        _require(m.init in INITS, "model.init", m.init, f"choose one of {', '.join(INITS)}")
        _require(
            all(h >= 1 for h in m.hidden),
            "model.hidden",
            list(m.hidden),
            "layer sizes must be >= 1",
        )
    resolve_device(cfg.device)


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


def build_family(task: DictConfig) -> Sinusoid:
    if task.name == "sinusoid":
        return Sinusoid(
            amplitude_min=task.amplitude_min,
            amplitude_max=task.amplitude_max,
            phase_min=task.phase_min,
            phase_max=task.phase_max,
            x_min=task.x_min,
            x_max=task.x_max,
        )
    raise UserError(f"task.name={task.name}: choose one of sinusoid")


def build_model(model: DictConfig, family: Sinusoid) -> nn.Module:
    if model.name == "mlp":
        net = MLP(
            in_features=family.input_shape[0],
            out_features=family.output_size,
            hidden=list(model.hidden),
            activation=model.activation,
            init=model.init,
        )
    else:
        raise UserError(f"model.name={model.name}: choose one of mlp")
    check_supported(net)
    return net


def build_learner(cfg: DictConfig, model: nn.Module, task_loss: TaskLoss) -> MAML | Pretrain:
    if cfg.algorithm.name == "pretrain":
        return Pretrain(model, task_loss)
    return MAML(
        model,
        task_loss,
        inner_lr=cfg.inner.lr,
        inner_steps=cfg.inner.steps,
        first_order=cfg.inner.first_order,
    )


def build_optimizer(outer: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``outer._target_`` (any ``torch.optim`` class) over the model's parameters."""
    kwargs = {}
    if "foreach" not in outer and outer._target_ in ("torch.optim.Adam", "torch.optim.AdamW"):
        kwargs["foreach"] = True  # one multi-tensor kernel per update, not one per parameter
    try:
        optimizer = hydra.utils.instantiate(outer, params=list(model.parameters()), **kwargs)
    except Exception as exc:  # Hydra wraps import and argument errors
        cause = exc.__cause__ or exc
        raise UserError(f"outer._target_={outer._target_}: cannot build it ({cause})") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"outer._target_={outer._target_}: not a torch.optim.Optimizer class")
    return optimizer


def build(cfg: DictConfig) -> Experiment:
    """Validate ``cfg`` and build everything a run needs (model weights from the global RNG)."""
    validate(cfg)
    device = resolve_device(cfg.device)
    family = build_family(cfg.task)
    model = build_model(cfg.model, family).to(device)
    task_loss = regression_loss()
    learner = build_learner(cfg, model, task_loss)
    stream = TaskStream(
        family,
        meta_batch_size=cfg.trainer.meta_batch_size,
        k_shot=cfg.task.k_shot,
        query_size=cfg.task.query_size,
        seed=cfg.seed,
        device=device,
    )
    eval_sets = dict(k_shot=cfg.task.eval_k_shot, query_size=cfg.task.eval_query_size)
    val_tasks = None
    if cfg.trainer.val_every > 0:
        val_tasks = FixedTasks(
            family,
            num_tasks=cfg.trainer.val_tasks,
            seed=cfg.trainer.val_seed,
            device=device,
            **eval_sets,
        )
    test_tasks = FixedTasks(
        family, num_tasks=cfg.eval.num_tasks, seed=cfg.eval.seed, device=device, **eval_sets
    )
    return Experiment(device, family, model, task_loss, learner, stream, val_tasks, test_tasks)
