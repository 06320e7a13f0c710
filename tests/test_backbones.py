"""The backbone presets (ResNet-12, conv4 with another normalisation) against a per-task loop.

Float64 meta-gradients of MAML through each engine the models get (ResNet-12 and the group /
layer norm conv4 on the torch.func path, conv4 without norm on the batched layers) equal the
independent per-task ``torch.autograd`` loop of ``tests/test_general_path.py`` to 1e-10 relative,
first and second order, 1 and 3 inner steps; the presets compose and build by config.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maml_runner.build import build, build_model
from maml_runner.errors import InvalidArgument, UserError
from maml_runner.maml import TaskBatch
from maml_runner.maml.engine import BatchedEngine, FuncEngine, engine_for
from maml_runner.models import Conv4, ResNet12
from tests.helpers import make_config
from tests.test_general_path import DTYPE, assert_same, meta_gradient, reference_meta_gradient

T, WAYS, SHOT, QUERY = 3, 3, 2, 2
TINY_WIDTHS = [4, 6, 8, 4]

MODELS = {
    "resnet12_batch": lambda: ResNet12(2, 16, WAYS, TINY_WIDTHS, norm="batch"),
    "resnet12_group": lambda: ResNet12(2, 16, WAYS, TINY_WIDTHS, norm="group", norm_groups=2),
    "resnet12_layer": lambda: ResNet12(2, 16, WAYS, TINY_WIDTHS, norm="layer"),
    "resnet12_none": lambda: ResNet12(2, 16, WAYS, [3, 4, 5, 6], norm="none"),
    "conv4_group": lambda: Conv4(2, 16, WAYS, filters=4, blocks=3, norm="group", norm_groups=2),
    "conv4_layer": lambda: Conv4(
        2, 16, WAYS, filters=4, blocks=3, downsample="max_pool", head="flatten", norm="layer"
    ),
    "conv4_none": lambda: Conv4(2, 16, WAYS, filters=4, blocks=3, norm="none"),
}


def make(name: str) -> nn.Module:
    torch.manual_seed(2)
    return MODELS[name]().to(DTYPE)


def image_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, WAYS * SHOT, 2, 16, 16, generator=g, dtype=DTYPE)
    xq = torch.randn(T, WAYS * QUERY, 2, 16, 16, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat_interleave(SHOT).expand(T, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(T, -1)
    return TaskBatch(xs, ys, xq, yq)


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_meta_gradient_matches_a_per_task_autograd_loop(
    name: str, steps: int, first_order: bool
) -> None:
    model, batch = make(name), image_batch()
    ours = meta_gradient(model, batch, False, steps, first_order)
    ref = reference_meta_gradient(model, batch, False, steps, first_order)
    assert_same(ours, ref, [n for n, _ in model.named_parameters()], 1e-10)


def test_each_model_takes_the_engine_that_covers_it() -> None:
    for name in ("resnet12_batch", "resnet12_group", "conv4_group", "conv4_layer"):
        assert isinstance(engine_for(make(name)), FuncEngine), name
    assert engine_for(make("resnet12_batch")).description.endswith(
        "ResNet12 (the model) overrides forward"
    )
    assert engine_for(make("conv4_group")).description.endswith(
        "GroupNorm (1) is not a batched layer"
    )
    assert isinstance(engine_for(make("conv4_none")), BatchedEngine)
    assert isinstance(engine_for(Conv4(1, 28, 5)), BatchedEngine)  # the paper's: unchanged


def test_resnet12_shape_and_residual_forward() -> None:
    model = ResNet12(3, 84, 5)
    assert [b.convs[0].out_channels for b in model.blocks] == [64, 160, 320, 640]
    assert sum(p.numel() for p in model.parameters()) == 12_427_525
    narrow = ResNet12(3, 84, 5, [16, 40, 80, 160])
    assert narrow(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    block = narrow.blocks[0]
    x = torch.randn(2, 3, 84, 84)
    without_shortcut = block.norms[2](
        block.convs[2](
            torch.nn.functional.leaky_relu(
                block.norms[1](
                    block.convs[1](
                        torch.nn.functional.leaky_relu(block.norms[0](block.convs[0](x)), 0.1)
                    )
                ),
                0.1,
            )
        )
    )
    with_shortcut = without_shortcut + block.shortcut(x)
    expected = block.pool(torch.nn.functional.leaky_relu(with_shortcut, 0.1))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    ("make_it", "key", "message"),
    [
        (lambda: ResNet12(3, 84, 5, [16, 0]), "widths", "integers >= 1"),
        (lambda: ResNet12(3, 8, 5), "image_size", "give >= 16"),
        (lambda: ResNet12(3, 84, 5, norm="instance"), "norm", "choose one of batch, group"),
        (
            lambda: ResNet12(3, 84, 5, [16, 40], norm="group", norm_groups=3),
            "norm_groups",
            "divides",
        ),
        (lambda: ResNet12(3, 84, 5, dropout=1.0), "dropout", r"\[0, 1\)"),
        (lambda: Conv4(1, 28, 5, norm="batchnorm"), "norm", "choose one of"),
        (lambda: Conv4(1, 28, 5, norm="group", norm_groups=5), "norm_groups", "divides"),
    ],
)
def test_bad_arguments_are_named(make_it, key: str, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument, match=message) as err:
        make_it()
    assert err.value.name == key


SMALL = ["device=cpu", "eval.num_tasks=2", "trainer.val_tasks=2", "eval.batch_size=2"]


@pytest.mark.parametrize(
    ("overrides", "kind", "widths"),
    [
        (["model=resnet12_narrow"], ResNet12, [16, 40, 80, 160]),
        (["model=resnet12"], ResNet12, [64, 160, 320, 640]),
        ([], Conv4, None),
    ],
    ids=["resnet12_narrow", "resnet12", "conv4_miniimagenet"],
)
def test_the_miniimagenet_presets_choose_a_backbone(
    overrides: list[str], kind: type, widths: list[int] | None
) -> None:
    cfg = make_config(["experiment=finn17_miniimagenet_5w1s", *overrides])
    from maml_runner.build import build_families

    family = build_families(cfg, torch.device("cpu"))["train"]
    model = build_model(cfg.model, family)
    assert isinstance(model, kind)
    if widths:
        assert [b.convs[0].out_channels for b in model.blocks] == widths
        assert model.head.out_features == 5
    else:  # the paper's miniImageNet conv4, as before the preset moved to conf/model
        assert model[0].out_channels == 32 and isinstance(model[3], nn.MaxPool2d)


def test_a_narrow_resnet12_meta_trains_a_step_by_config() -> None:
    cfg = make_config(
        [
            "experiment=finn17_miniimagenet_5w1s",
            "model=resnet12_narrow",
            "model.norm=group",
            "trainer.meta_batch_size=2",
            "inner.steps=1",
            *SMALL,
        ]
    )
    with build(cfg) as job:
        assert isinstance(job.model.blocks[0].norms[0], nn.GroupNorm)
        before = {n: p.detach().clone() for n, p in job.params.items()}
        assert torch.isfinite(job.update(0))
        assert any(not torch.equal(before[n], p) for n, p in job.params.items())


def test_a_bad_backbone_key_names_the_config_key() -> None:
    cfg = make_config(
        [
            "experiment=finn17_miniimagenet_5w1s",
            "model=resnet12_narrow",
            "model.norm_groups=3",
            "model.norm=group",
            *SMALL,
        ]
    )
    with pytest.raises(UserError, match=r"^model.norm_groups=3: group norm needs"):
        build(cfg)
