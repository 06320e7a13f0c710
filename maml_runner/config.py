"""Typed schemas for the scalar knobs, registered in Hydra's ConfigStore.

Each group's YAML files start with ``defaults: [base, _self_]``, so OmegaConf rejects a value of
the wrong type (``inner.lr=abc``) or an unknown key (``inner.lrr=0.1``) while composing. Ranges
(``k > 0``, ``lr >= 0``) are checked in ``build.validate`` with messages for people.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class InnerConfig:
    # α: step size of the inner (adaptation) gradient steps
    lr: float = 0.01
    # gradient steps on the support set during meta-training
    steps: int = 1
    # drop the second-order term of the meta-gradient (FOMAML)
    first_order: bool = False
    # adaptation steps at meta-test (and validation); metrics are reported after 0..eval_steps
    eval_steps: int = 10


@dataclass
class TrainerConfig:
    # tasks per meta-batch (the outer update averages their query losses)
    meta_batch_size: int = 25
    # meta-iterations (outer updates)
    steps: int = 70_000
    # validate every N meta-iterations (0: never)
    val_every: int = 5_000
    # validation tasks (fixed by trainer.val_seed)
    val_tasks: int = 100
    val_seed: int = 1
    # write checkpoints/last.pt every N meta-iterations (0: only at the end and on interrupt)
    checkpoint_every: int = 5_000
    # average the training loss over N meta-iterations for the log and progress display
    log_every: int = 100
    # show a live progress display
    progress: bool = True
    # CPU threads for torch (null: torch's default, one per core). 1 suits small models: their
    # ops are too short to split, and idle threads spinning beside another job slow both
    num_threads: int | None = 1
    # tasks whose forward and backward run together; the meta-gradient is summed over the
    # passes (the same gradient; fewer tasks need less memory and more kernel launches). auto:
    # the whole meta-batch on a GPU, on a CPU as many tasks as keep activations within 32 MiB
    tasks_per_pass: Any = "auto"


@dataclass
class EvalConfig:
    # held-out tasks at meta-test (the paper uses 600)
    num_tasks: int = 600
    # seed of the meta-test tasks; the same for every run, so runs compare on identical tasks
    seed: int = 2
    # tasks adapted together at meta-test (bounds memory; results do not depend on it)
    batch_size: int = 600
    # inner steps shown in the summary table, e.g. the paper's columns [1, 5, 10]
    report_steps: list[int] = field(default_factory=lambda: [0, 1, 5, 10])
    # example tasks drawn in the task plot (regression only; 0: no plot)
    plot_tasks: int = 4
    # the θ meta-tested when validation ran: best (the best validation step's) | last
    checkpoint: str = "best"


@dataclass
class LoggerConfig:
    # online | offline | disabled. offline needs no account or network; `wandb sync` uploads later
    mode: str = "offline"
    project: str = "maml-runner"
    entity: str | None = None
    # W&B group; by default the sweep (multirun) folder groups its jobs
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class AlgorithmConfig:
    # maml | pretrain (the paper's baseline: one model trained on all tasks, fine-tuned at test)
    name: str = "maml"


@dataclass
class SinusoidConfig:
    name: str = "sinusoid"
    # K: support points per task in meta-training
    k_shot: int = 5
    # query points per task in meta-training
    query_size: int = 5
    # support points per task at validation and meta-test
    eval_k_shot: int = 5
    # query points per test task (more points: a less noisy MSE; its expectation is the same)
    eval_query_size: int = 100
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = 3.141592653589793
    x_min: float = -5.0
    x_max: float = 5.0


@dataclass
class OmniglotConfig:
    name: str = "omniglot"
    # N: classes per task
    n_way: int = 5
    # K: support examples per class
    k_shot: int = 1
    # query examples per class in meta-training
    query_size: int = 15
    eval_k_shot: int = 1
    eval_query_size: int = 15
    # paper (1200/423 characters at random, as the MAML paper) | background (Lake et al.)
    split: str = "paper"
    split_seed: int = 1
    # show each class of a task at a random multiple of 90° (as the reference code)
    rotations: bool = True
    image_size: int = 28
    # lanczos (anti-aliased) | nearest
    resample: str = "lanczos"


@dataclass
class MiniImageNetConfig:
    name: str = "miniimagenet"
    n_way: int = 5
    k_shot: int = 1
    query_size: int = 15
    eval_k_shot: int = 1
    eval_query_size: int = 15
    image_size: int = 84


@dataclass
class RLTaskConfig:
    # nav2d | cheetah_dir | cheetah_vel | ant_dir | ant_vel (the task file's name)
    name: str = "nav2d"
    # nav2d (torch point robot) | a gymnasium MuJoCo id with x_velocity (HalfCheetah-v5, Ant-v5)
    env: str = "nav2d"
    # position (nav2d) | direction (±1) | velocity (U[goal_low, goal_high])
    goal: str = "position"
    goal_low: float = -0.5
    goal_high: float = 0.5
    # K: trajectories per task for each inner policy-gradient step, and after it
    k_shot: int = 20
    # K at validation and meta-test
    eval_k_shot: int = 20
    # steps per episode
    horizon: int = 100
    # γ of the returns-to-go the advantages are built from
    discount: float = 0.99
    # standardise each task's advantages (mean 0, std 1), as the reference implementations
    normalize_advantages: bool = True
    # nav2d: distance (−‖x − g‖, reference code) | squared_distance (the paper's text)
    reward: str = "distance"
    # nav2d: actions are clipped to ±action_bound; an episode ends within goal_radius of the goal
    action_bound: float = 0.1
    goal_radius: float = 0.01
    # keyword arguments of gymnasium.make (reward weights, observation options)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # processes stepping the MuJoCo environments (nav2d is vectorised in torch and ignores it)
    workers: int = 2
    # at meta-test, steps after the first use α/2 (the reference code's test protocol)
    eval_halve_lr: bool = True


@dataclass
class DataConfig:
    # folder with the dataset's archives; null: <cache_dir>/<task name>
    root: str | None = None
    # fetch missing archives from the official location (checksummed)
    download: bool = False
    # decoded tensors are cached here, keyed by the archives' content
    cache_dir: str = "~/.cache/maml-runner"


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    # relu | tanh | elu
    activation: str = "relu"
    # torch (PyTorch default) | paper (truncated normal σ=0.01, zero bias, as the reference code)
    init: str = "torch"
    # batch norm after every hidden layer (per-task batch statistics)
    batch_norm: bool = False


@dataclass
class Conv4Config:
    name: str = "conv4"
    filters: int = 64
    blocks: int = 4
    # stride (stride-2 convs, Omniglot) | max_pool (2×2 max-pooling, miniImageNet)
    downsample: str = "stride"
    # mean (spatial average, Omniglot in the reference code) | flatten (miniImageNet)
    head: str = "mean"


@dataclass
class GaussianMLPConfig:
    name: str = "gaussian_mlp"
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    activation: str = "relu"
    # initial standard deviation of the actions (a learned, state-independent log-std)
    init_std: float = 1.0


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
    "model": {
        "base_mlp": MLPConfig,
        "base_conv4": Conv4Config,
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


register()
