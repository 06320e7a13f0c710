"""Typed schemas for the scalar knobs, registered in Hydra's ConfigStore: types only.

Each group's YAML files start with ``defaults: [base, _self_]``, so OmegaConf rejects a value of
the wrong type (``inner.lr=abc``) or an unknown key (``inner.lrr=0.1``) while composing. Ranges
(``k > 0``, ``lr >= 0``) are checked in ``build.validate`` with messages for people.

Values, their meaning, units and ranges live in ``conf/`` alone: every field here is
``MISSING`` (``???``), and the YAML composed over the schema sets it (``null`` for an optional
key). A YAML that forgot a key leaves ``???``, which the config tests catch for every option
and preset (and a run would stop at with OmegaConf's MissingMandatoryValue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class InnerConfig:
    """The inner loop (adaptation): ``conf/inner/*.yaml``."""

    lr: float = MISSING
    steps: int = MISSING
    first_order: bool = MISSING
    eval_steps: int = MISSING


@dataclass
class TrainerConfig:
    """The outer loop and its cadence: ``conf/trainer/*.yaml``."""

    meta_batch_size: int = MISSING
    steps: int = MISSING
    val_every: int = MISSING
    val_tasks: int = MISSING
    val_seed: int = MISSING
    checkpoint_every: int = MISSING
    keep_best: int = MISSING
    log_every: int = MISSING
    progress: bool = MISSING
    num_threads: Any = MISSING
    tasks_per_pass: Any = MISSING


@dataclass
class EvalConfig:
    """The meta-test protocol: ``conf/eval/*.yaml``."""

    num_tasks: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    report_steps: list[int] = MISSING
    plot_tasks: int = MISSING
    checkpoint: str = MISSING


@dataclass
class LoggerConfig:
    """Weights & Biases: ``conf/logger/*.yaml``."""

    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class AlgorithmConfig:
    """The meta-learning algorithm: ``conf/algorithm/*.yaml``."""

    name: str = MISSING


@dataclass
class MetaSGDConfig:
    """Meta-SGD: ``conf/algorithm/metasgd.yaml``."""

    name: str = MISSING
    lr_init: list[float] = MISSING


@dataclass
class ANILConfig:
    """ANIL: ``conf/algorithm/anil.yaml``."""

    name: str = MISSING
    head: list[str] | None = MISSING


@dataclass
class MAMLppConfig:
    """MAML++: ``conf/algorithm/mamlpp.yaml``."""

    name: str = MISSING
    msl: bool = MISSING
    msl_epochs: int = MISSING
    da_epochs: int = MISSING
    lslr: bool = MISSING
    bnwb: bool = MISSING
    epoch_length: int = MISSING


@dataclass
class ReptileConfig:
    """Reptile (Nichol et al. 2018): ``conf/algorithm/reptile.yaml``."""

    name: str = MISSING
    inner_optimizer: str = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_eps: float = MISSING
    inner_batch_size: int | None = MISSING
    eval_batch_size: int | None = MISSING
    transductive: bool = MISSING


@dataclass
class SinusoidConfig:
    """Sinusoid regression: ``conf/task/sinusoid.yaml``."""

    name: str = MISSING
    k_shot: int = MISSING
    query_size: int = MISSING
    eval_k_shot: int = MISSING
    eval_query_size: int = MISSING
    amplitude_min: float = MISSING
    amplitude_max: float = MISSING
    phase_min: float = MISSING
    phase_max: float = MISSING
    x_min: float = MISSING
    x_max: float = MISSING


@dataclass
class OmniglotConfig:
    """Omniglot classification: ``conf/task/omniglot.yaml``."""

    name: str = MISSING
    n_way: int = MISSING
    k_shot: int = MISSING
    query_size: int = MISSING
    eval_k_shot: int = MISSING
    eval_query_size: int = MISSING
    split: str = MISSING
    split_seed: int = MISSING
    rotations: bool = MISSING
    image_size: int = MISSING
    resample: str = MISSING


@dataclass
class MiniImageNetConfig:
    """miniImageNet classification: ``conf/task/miniimagenet.yaml``."""

    name: str = MISSING
    n_way: int = MISSING
    k_shot: int = MISSING
    query_size: int = MISSING
    eval_k_shot: int = MISSING
    eval_query_size: int = MISSING
    image_size: int = MISSING


@dataclass
class RLTaskConfig:
    """RL task families (nav2d and MuJoCo locomotion): the task files with ``base_rl``.

    The keys one kind of robot has and the other lacks are null in the other's task files, and
    ``build.validate_rl`` refuses a value there (``NAV2D_ONLY``, ``MUJOCO_ONLY``, ``GOAL_RANGE``).
    """

    name: str = MISSING
    env: str = MISSING
    goal: str = MISSING
    k_shot: int = MISSING
    eval_k_shot: int = MISSING
    horizon: int = MISSING
    discount: float = MISSING
    normalize_advantages: bool = MISSING
    sampling: str = MISSING
    eval_later_lr_scale: float = MISSING
    test_goals: str = MISSING
    # position and velocity goals (nav2d, *_vel); null for direction goals (±1)
    goal_low: float | None = MISSING
    goal_high: float | None = MISSING
    # nav2d's point robot only; null for the MuJoCo robots
    reward: str | None = MISSING
    action_bound: float | None = MISSING
    goal_radius: float | None = MISSING
    action_map: str | None = MISSING
    goal_shape: str | None = MISSING
    # gymnasium MuJoCo robots only; {} and null for nav2d
    env_kwargs: dict[str, Any] = MISSING
    workers: int | None = MISSING
    robot: str | None = MISSING


@dataclass
class DataConfig:
    """Where datasets come from: ``conf/data/*.yaml``."""

    root: str | None = MISSING
    download: bool = MISSING
    cache_dir: str = MISSING


@dataclass
class MLPConfig:
    """Fully connected network: ``conf/model/mlp.yaml``."""

    name: str = MISSING
    hidden: list[int] = MISSING
    activation: str = MISSING
    init: str = MISSING
    batch_norm: bool = MISSING
    batch_norm_stats: str = MISSING


@dataclass
class Conv4Config:
    """The paper's conv net: ``conf/model/conv4.yaml``."""

    name: str = MISSING
    filters: int = MISSING
    blocks: int = MISSING
    downsample: str = MISSING
    head: str = MISSING
    norm: str = MISSING
    norm_groups: int = MISSING
    batch_norm_stats: str = MISSING


@dataclass
class ResNet12Config:
    """ResNet-12 (MetaOptNet's backbone): ``conf/model/resnet12.yaml``."""

    name: str = MISSING
    widths: list[int] = MISSING
    norm: str = MISSING
    norm_groups: int = MISSING
    dropout: float = MISSING
    batch_norm_stats: str = MISSING


@dataclass
class GaussianMLPConfig:
    """Gaussian MLP policy: ``conf/model/gaussian_mlp.yaml``."""

    name: str = MISSING
    hidden: list[int] = MISSING
    activation: str = MISSING
    init_std: float = MISSING
    init: str = MISSING


# ``model=custom``: any module by its import path. Its keys beyond ``name``, ``_target_`` and
# ``batch_norm_stats`` (build's, not the module's) are
# the module's own keyword arguments, unknown in advance, so this schema is an open node (OmegaConf
# has no dataclass that takes extra fields): ``model.channels=[64,128]`` works without ``+``. The
# other models' schemas stay closed, so a typo there (``model.hiden``) is still refused.
CUSTOM_MODEL: DictConfig = OmegaConf.create(
    {"name": MISSING, "_target_": MISSING, "batch_norm_stats": MISSING}, flags={"struct": False}
)

SCHEMAS: dict[str, Any] = {
    "inner": InnerConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "algorithm": AlgorithmConfig,
    "data": DataConfig,
}

# Several schemas per group are possible (task families): each is stored as base_<name>.
GROUP_SCHEMAS: dict[str, dict[str, Any]] = {
    "task": {
        "base_sinusoid": SinusoidConfig,
        "base_omniglot": OmniglotConfig,
        "base_miniimagenet": MiniImageNetConfig,
        "base_rl": RLTaskConfig,
    },
    "algorithm": {
        "base_metasgd": MetaSGDConfig,
        "base_anil": ANILConfig,
        "base_mamlpp": MAMLppConfig,
        "base_reptile": ReptileConfig,
    },
    "model": {
        "base_mlp": MLPConfig,
        "base_conv4": Conv4Config,
        "base_resnet12": ResNet12Config,
        "base_gaussian_mlp": GaussianMLPConfig,
    },
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name="base", node=node)
    for group, nodes in GROUP_SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)
    cs.store(group="model", name="base_custom", node=CUSTOM_MODEL)


register()
