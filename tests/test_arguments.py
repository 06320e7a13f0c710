"""Every constructor and loader refuses a bad argument with ``InvalidArgument`` naming its own
parameter, and its message says what is allowed (choices listed from the module's tuple)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from maml_runner.data.miniimagenet import load_miniimagenet
from maml_runner.data.omniglot import (
    NUM_DRAWINGS,
    RESAMPLE,
    OmniglotData,
    background_split,
    load_omniglot,
    paper_split,
)
from maml_runner.errors import InvalidArgument
from maml_runner.maml import MAML, regression_loss
from maml_runner.models import MLP, Conv4, GaussianPolicy
from maml_runner.models.conv import DOWNSAMPLE, HEADS
from maml_runner.models.mlp import ACTIVATIONS, INITS
from maml_runner.rl.envs import GOALS, NAV_REWARDS, Locomotion, Nav2D
from maml_runner.rl.meta import MetaRL, RLTaskStream
from maml_runner.rl.trpo import TRPO
from maml_runner.tasks import FixedTasks, Sinusoid, TaskStream
from maml_runner.tasks.classification import ImageClasses

CPU = torch.device("cpu")
INTEGER = "must be an integer >= 1"


def one_of(choices: object) -> str:
    return "choose one of " + ", ".join(map(str, choices))  # type: ignore[call-overload]


def images(classes: int = 4, examples: int = 3, height: int = 5, width: int = 5) -> torch.Tensor:
    return torch.zeros(classes, examples, 1, height, width, dtype=torch.uint8)


def stream(**kw: object) -> TaskStream:
    args: dict = dict(meta_batch_size=2, k_shot=1, query_size=1, seed=0, device=CPU) | kw
    return TaskStream(Sinusoid(), **args)


def fixed(**kw: object) -> FixedTasks:
    args: dict = dict(num_tasks=4, k_shot=1, query_size=1, seed=0, device=CPU) | kw
    return FixedTasks(Sinusoid(), **args)


def omniglot_data() -> OmniglotData:
    """Three background alphabets of one character each and one evaluation alphabet."""
    return OmniglotData(
        images=torch.zeros(4, NUM_DRAWINGS, 2, 2, dtype=torch.uint8),
        alphabets=["Alpha", "Beta", "Gamma", "Delta"],
        character_ids=[1, 2, 3, 4],
        background=torch.tensor([True, True, True, False]),
    )


def meta_rl(**kw: object) -> MetaRL:
    policy = GaussianPolicy(2, 2, hidden=(4,))
    args: dict = dict(
        inner_lr=0.1,
        inner_steps=1,
        first_order=False,
        episodes_per_task=2,
        horizon=5,
        discount=0.99,
        normalize_advantages=True,
    )
    return MetaRL(Nav2D(), policy, **(args | kw))


def maml(**kw: object) -> MAML:
    args: dict = dict(inner_lr=0.01, inner_steps=1) | kw
    return MAML(MLP(1, 1), regression_loss(), **args)


# (id, call(tmp_path), parameter named, text the message must contain)
CASES: list[tuple[str, Callable[[Path], object], str, str]] = [
    ("sinusoid-amp-min", lambda _: Sinusoid(amplitude_min=-1.0), "amplitude_min", "must be >= 0"),
    (
        "sinusoid-amp-max",
        lambda _: Sinusoid(amplitude_max=0.05),
        "amplitude_max",
        "must be >= amplitude_min (0.1)",
    ),
    ("sinusoid-phase", lambda _: Sinusoid(phase_max=-1.0), "phase_max", "must be >= phase_min"),
    ("sinusoid-x", lambda _: Sinusoid(x_max=-5.0), "x_max", "must be > x_min (-5.0)"),
    (
        "classes-images",
        lambda _: ImageClasses(torch.zeros(4, 3, 5, 5), n_way=2),
        "images",
        "need [classes, examples, C, H, W]",
    ),
    ("classes-n-way-1", lambda _: ImageClasses(images(), n_way=1), "n_way", "integer >= 2"),
    ("classes-n-way-big", lambda _: ImageClasses(images(), n_way=5), "n_way", "n_way <= 4"),
    (
        "classes-rotations",
        lambda _: ImageClasses(images(width=6), n_way=2, rotations=True),
        "rotations",
        "need square images",
    ),
    (
        "classes-k-shot",
        lambda _: ImageClasses(images(), n_way=2).sample(
            1, torch.Generator(), k_shot=2, query_size=2
        ),
        "k_shot",
        "choose a smaller sum",
    ),
    ("stream-meta-batch", lambda _: stream(meta_batch_size=0), "meta_batch_size", INTEGER),
    ("stream-k-shot", lambda _: stream(k_shot=0), "k_shot", INTEGER),
    ("stream-query", lambda _: stream(query_size=0), "query_size", INTEGER),
    ("stream-chunk", lambda _: stream(chunk=0), "chunk", INTEGER),
    ("fixed-num-tasks", lambda _: fixed(num_tasks=0), "num_tasks", INTEGER),
    ("fixed-k-shot", lambda _: fixed(k_shot=1.5), "k_shot", INTEGER),
    ("fixed-query", lambda _: fixed(query_size=0), "query_size", INTEGER),
    ("fixed-chunk", lambda _: fixed(chunk=0), "chunk", INTEGER),
    ("mlp-in", lambda _: MLP(0, 1), "in_features", INTEGER),
    ("mlp-out", lambda _: MLP(1, 0), "out_features", INTEGER),
    ("mlp-hidden", lambda _: MLP(1, 1, hidden=[40, 0]), "hidden", "integers >= 1"),
    ("mlp-activation", lambda _: MLP(1, 1, activation="gelu"), "activation", one_of(ACTIVATIONS)),
    ("mlp-init", lambda _: MLP(1, 1, init="glorot"), "init", one_of(INITS)),
    ("conv-channels", lambda _: Conv4(0, 28, 5), "in_channels", INTEGER),
    ("conv-image-size", lambda _: Conv4(1, 0, 5), "image_size", INTEGER),
    ("conv-classes", lambda _: Conv4(1, 28, 0), "num_classes", INTEGER),
    ("conv-filters", lambda _: Conv4(1, 28, 5, filters=0), "filters", INTEGER),
    ("conv-blocks", lambda _: Conv4(1, 28, 5, blocks=0), "blocks", INTEGER),
    (
        "conv-downsample",
        lambda _: Conv4(1, 28, 5, downsample="avg_pool"),
        "downsample",
        one_of(DOWNSAMPLE),
    ),
    ("conv-head", lambda _: Conv4(1, 28, 5, head="max"), "head", one_of(HEADS)),
    ("policy-std", lambda _: GaussianPolicy(2, 2, init_std=0.0), "init_std", "must be > 0"),
    (
        "policy-activation",
        lambda _: GaussianPolicy(2, 2, activation="gelu"),
        "activation",
        one_of(ACTIVATIONS),
    ),
    (
        "omniglot-image-size",
        lambda tmp: load_omniglot(tmp, cache_dir=tmp, image_size=0),
        "image_size",
        INTEGER,
    ),
    (
        "omniglot-resample",
        lambda tmp: load_omniglot(tmp, cache_dir=tmp, resample="bicubic"),
        "resample",
        one_of(RESAMPLE),
    ),
    (
        "omniglot-root",
        lambda tmp: load_omniglot(tmp, cache_dir=tmp),
        "root",
        "images_background.zip is missing; point root at a folder holding",
    ),
    (
        "paper-num-train",
        lambda _: paper_split(num_train=2000),
        "num_train",
        "choose num_train <= 1623",
    ),
    ("paper-num-train-neg", lambda _: paper_split(num_train=-1), "num_train", ">= 0"),
    (
        "paper-num-val",
        lambda _: paper_split(num_val=1300),
        "num_val",
        "choose num_val <= 1200",
    ),
    ("paper-num-val-neg", lambda _: paper_split(num_val=-1), "num_val", ">= 0"),
    (
        "background-count",
        lambda _: background_split(omniglot_data(), val_alphabets=3),
        "val_alphabets",
        "must be 0 to 2 (there are 3 background alphabets)",
    ),
    (
        "background-names",
        lambda _: background_split(omniglot_data(), val_alphabets=["Delta"]),
        "val_alphabets",
        "choose from ['Alpha', 'Beta', 'Gamma']",
    ),
    (
        "mini-image-size",
        lambda tmp: load_miniimagenet(tmp, cache_dir=tmp, image_size=0),
        "image_size",
        INTEGER,
    ),
    (
        "mini-root-unset",
        lambda tmp: load_miniimagenet(None, cache_dir=tmp),
        "root",
        "not downloadable automatically",
    ),
    (
        "mini-root-missing",
        lambda tmp: load_miniimagenet(tmp / "nowhere", cache_dir=tmp),
        "root",
        "no such folder",
    ),
    (
        "mini-root-empty",
        lambda tmp: load_miniimagenet(tmp, cache_dir=tmp),
        "root",
        "no miniImageNet layout found",
    ),
    (
        "nav-goal-range",
        lambda _: Nav2D(goal_low=0.5, goal_high=-0.5),
        "goal_high",
        "must be >= goal_low (0.5)",
    ),
    ("nav-action-bound", lambda _: Nav2D(action_bound=0.0), "action_bound", "must be > 0"),
    ("nav-goal-radius", lambda _: Nav2D(goal_radius=-0.1), "goal_radius", "must be > 0"),
    ("nav-reward", lambda _: Nav2D(reward="manhattan"), "reward", one_of(NAV_REWARDS)),
    ("loco-goal", lambda _: Locomotion("HalfCheetah-v5", goal="height"), "goal", one_of(GOALS)),
    (
        "loco-goal-range",
        lambda _: Locomotion("HalfCheetah-v5", goal="velocity", goal_low=2.0, goal_high=0.0),
        "goal_high",
        "must be >= goal_low (2.0)",
    ),
    (
        "loco-workers",
        lambda _: Locomotion("HalfCheetah-v5", goal="velocity", workers=0),
        "workers",
        INTEGER,
    ),
    ("trpo-max-kl", lambda _: TRPO([], max_kl=0.0), "max_kl", "must be > 0"),
    ("trpo-cg-iters", lambda _: TRPO([], cg_iters=0), "cg_iters", INTEGER),
    ("trpo-cg-damping", lambda _: TRPO([], cg_damping=-1.0), "cg_damping", "must be >= 0"),
    (
        "trpo-backtrack-ratio",
        lambda _: TRPO([], backtrack_ratio=1.0),
        "backtrack_ratio",
        "need 0 < backtrack_ratio < 1",
    ),
    ("trpo-max-backtracks", lambda _: TRPO([], max_backtracks=0), "max_backtracks", INTEGER),
    ("trpo-fvp-eps", lambda _: TRPO([], fvp_eps=0.0), "fvp_eps", "null (exact products) or > 0"),
    ("trpo-fvp-eps-bool", lambda _: TRPO([], fvp_eps=True), "fvp_eps", "null (exact products)"),
    ("trpo-max-kl-str", lambda _: TRPO([], max_kl="abc"), "max_kl", "must be > 0"),
    ("meta-discount-0", lambda _: meta_rl(discount=0.0), "discount", "need 0 < discount <= 1"),
    ("meta-discount-big", lambda _: meta_rl(discount=1.5), "discount", "need 0 < discount <= 1"),
    (
        "rl-stream-meta-batch",
        lambda _: RLTaskStream(Nav2D(), meta_batch_size=0, seed=0),
        "meta_batch_size",
        INTEGER,
    ),
    ("meta-episodes", lambda _: meta_rl(episodes_per_task=0), "episodes_per_task", INTEGER),
    ("meta-horizon", lambda _: meta_rl(horizon=0), "horizon", INTEGER),
    ("meta-inner-lr", lambda _: meta_rl(inner_lr=-0.1), "inner_lr", "must be >= 0"),
    ("meta-inner-steps", lambda _: meta_rl(inner_steps=-1), "inner_steps", "integer >= 0"),
    ("maml-inner-lr", lambda _: maml(inner_lr=-0.1), "inner_lr", "must be >= 0"),
    ("maml-inner-steps", lambda _: maml(inner_steps=-1), "inner_steps", "integer >= 0"),
    ("maml-inner-steps-float", lambda _: maml(inner_steps=1.5), "inner_steps", "integer >= 0"),
]


@pytest.mark.parametrize(
    ("call", "name", "allowed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_argument_names_its_parameter(
    tmp_path: Path, call: Callable[[Path], object], name: str, allowed: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        call(tmp_path)
    assert err.value.name == name
    assert str(err.value).startswith(f"{name}={err.value.value}: ")
    assert allowed in err.value.allowed
    assert "\n" not in str(err.value)


def test_choices_are_listed_from_their_tuple() -> None:
    """Adding a choice to a module's tuple is the only edit its message needs."""
    with pytest.raises(InvalidArgument) as err:
        Nav2D(reward="nope")
    assert err.value.allowed == "choose one of distance, squared_distance" == one_of(NAV_REWARDS)
