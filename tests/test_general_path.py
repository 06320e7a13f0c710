"""The torch.func path (any module, by its own forward) against independent references, float64.

The references loop over tasks with ``torch.func.functional_call`` and plain
``torch.autograd.grad`` (``create_graph`` for second order) and their own losses; none of it
goes through ``vmap``, an engine or ``maml_runner``'s losses, so a bug in the engine cannot cancel
out of a comparison. Second order is also checked against central finite differences.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from maml_runner.build import build
from maml_runner.errors import UserError
from maml_runner.maml import MAML, TaskBatch, per_task
from maml_runner.maml.engine import BatchedEngine, FuncEngine, engine_for
from maml_runner.maml.functional import batched_forward, check_supported
from maml_runner.models import MLP, Conv4
from maml_runner.tasks.losses import classification_loss, regression_loss
from maml_runner.trainer import meta_backward
from tests.helpers import REPO, make_config
from tests.nets import NormConv, ResidualMLP, SkipSequential

DTYPE = torch.float64
T, WAYS, SHOT, QUERY, SIZE, LR = 4, 3, 2, 3, 8, 0.1


def skip_sequential() -> nn.Module:
    return SkipSequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


# name → (constructor, regression?)
MODELS = {
    "residual_mlp": (lambda: ResidualMLP([1], 1, width=8, blocks=2), True),
    "groupnorm_conv": (lambda: NormConv(1, SIZE, WAYS, "group"), False),
    "layernorm_conv": (lambda: NormConv(1, SIZE, WAYS, "layer"), False),
    "batchnorm_conv": (lambda: NormConv(1, SIZE, WAYS, "batch"), False),
    "skip_sequential": (skip_sequential, True),
}


def make(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().to(DTYPE)


def batch_for(regression: bool, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    if regression:
        xs, xq = (torch.randn(T, n, 1, generator=g, dtype=DTYPE) for n in (5, 7))
        return TaskBatch(xs, torch.sin(3 * xs), xq, torch.sin(3 * xq))
    xs = torch.randn(T, WAYS * SHOT, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    xq = torch.randn(T, WAYS * QUERY, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat_interleave(SHOT).expand(T, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(T, -1)
    return TaskBatch(xs, ys, xq, yq)


def scalar_loss(regression: bool, pred: Tensor, y: Tensor) -> Tensor:
    """One task's loss, written without ``maml_runner.tasks.losses``."""
    return ((pred - y) ** 2).mean() if regression else F.cross_entropy(pred, y)


def reference_meta_gradient(
    model: nn.Module, batch: TaskBatch, regression: bool, steps: int, first_order: bool
) -> list[Tensor]:
    """∇θ of the mean query loss after ``steps`` SGD steps, by a plain loop over tasks.

    First order: each step's gradient is a constant (``create_graph=False``), so dθ'/dθ = I.
    """
    model = copy.deepcopy(model)  # its batch norm may update running stats; ours must not
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=DTYPE)
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            pred = functional_call(model, fast, (batch.support_x[t],))
            loss = scalar_loss(regression, pred, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - LR * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        pred = functional_call(model, fast, (batch.query_x[t],))
        total = total + scalar_loss(regression, pred, batch.query_y[t])
    return list(torch.autograd.grad(total / batch.num_tasks, list(params.values())))


def meta_gradient(
    model: nn.Module, batch: TaskBatch, regression: bool, steps: int, first_order: bool
) -> list[Tensor]:
    task_loss = regression_loss() if regression else classification_loss()
    maml = MAML(model, task_loss, inner_lr=LR, inner_steps=steps, first_order=first_order)
    params = dict(model.named_parameters())
    return list(torch.autograd.grad(maml.outer_loss(params, batch), list(params.values())))


def assert_same(ours: list[Tensor], ref: list[Tensor], names: list[str], rel: float) -> None:
    """Max error relative to the largest reference entry (a bias feeding batch norm has a zero
    gradient, which rounding makes ~1e-17: relative to itself it would be noise)."""
    scale = max(b.abs().max().item() for b in ref)
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    for name, a, b in zip(names, ours, ref, strict=True):
        err = (a - b).abs().max().item() / scale
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


# ----------------------------------------------------------------------------- the choice


@pytest.mark.parametrize("name", MODELS)
def test_models_outside_the_batched_layers_take_the_torch_func_path(name: str) -> None:
    engine = engine_for(make(name))
    assert isinstance(engine, FuncEngine)
    assert "torch.func path, because" in engine.description


def test_the_choice_names_the_module_and_why() -> None:
    assert engine_for(skip_sequential()).description == (
        "model SkipSequential: torch.func path, because SkipSequential (the model) overrides "
        "Sequential.forward"
    )
    conv1d = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 3))
    assert engine_for(conv1d).description.endswith("Conv1d (1) is not a batched layer")
    mlp = MLP(1, 1)
    assert isinstance(engine_for(mlp), BatchedEngine)
    assert engine_for(mlp).description == "model MLP: batched layers"
    assert engine_for(mlp) is engine_for(mlp)  # chosen once per model


def test_sequential_subclass_runs_its_own_forward() -> None:
    model = make("skip_sequential")
    x = torch.randn(T, 5, 1, dtype=DTYPE)
    params = per_task(dict(model.named_parameters()), T)
    out = engine_for(model).forward(params, x)
    expected = torch.stack([model(x[t]) for t in range(T)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    plain = torch.stack([nn.Sequential.forward(model, x[t]) for t in range(T)])
    assert (out - plain).abs().max() > 0.1  # the skip connection is there
    # the batched layers refuse it rather than run it as its children
    with pytest.raises(TypeError, match=r"layer <root> is a SkipSequential that overrides"):
        batched_forward(model, params, x)
    with pytest.raises(TypeError, match=r"SkipSequential that overrides Sequential.forward"):
        check_supported(nn.Sequential(model))


# ------------------------------------------------------------------- exact meta-gradients


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_meta_gradient_matches_a_per_task_autograd_loop(
    name: str, steps: int, first_order: bool
) -> None:
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    ours = meta_gradient(model, batch, regression, steps, first_order)
    ref = reference_meta_gradient(model, batch, regression, steps, first_order)
    assert_same(ours, ref, [n for n, _ in model.named_parameters()], 1e-10)


def test_first_and_second_order_differ() -> None:
    model, batch = make("layernorm_conv"), batch_for(False)
    second = meta_gradient(model, batch, False, 1, False)
    first = meta_gradient(model, batch, False, 1, True)
    assert max((a - b).abs().max().item() for a, b in zip(first, second, strict=True)) > 1e-6


@pytest.mark.parametrize("name", ["residual_mlp", "batchnorm_conv"])
def test_second_order_matches_central_finite_differences(name: str) -> None:
    model, regression = make(name), MODELS[name][1]
    batch, steps = batch_for(regression), 2
    task_loss = regression_loss() if regression else classification_loss()
    maml = MAML(model, task_loss, inner_lr=LR, inner_steps=steps)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(maml.outer_loss(params, batch), list(params.values()))
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params.values()]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction, strict=True))
    eps = 1e-5

    def loss_at(sign: float) -> float:
        moved = {n: p.detach() + sign * eps * d for (n, p), d in zip(params.items(), direction)}
        return maml.outer_loss(moved, batch).item()

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    assert abs(numeric - analytic.item()) <= 1e-7 * max(1.0, abs(numeric))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_meta_gradient_in_passes_equals_one_pass(first_order: bool) -> None:
    model, batch = make("groupnorm_conv"), batch_for(False)
    maml = MAML(model, classification_loss(), inner_lr=LR, inner_steps=2, first_order=first_order)
    params = dict(model.named_parameters())
    meta_backward(maml, params, batch)
    whole = [p.grad.clone() for p in params.values()]
    model.zero_grad(set_to_none=True)
    meta_backward(maml, params, batch, tasks_per_pass=3)  # passes of 3 + 1 tasks
    assert_same([p.grad for p in params.values()], whole, list(params), 1e-12)


# -------------------------------------------------- both engines on models both can run


BOTH = {
    "mlp": (lambda: MLP(1, 1, hidden=[8, 8], activation="tanh"), True),
    "mlp_batchnorm": (lambda: MLP(1, 1, hidden=[8, 8], batch_norm=True), True),
    "conv4": (lambda: Conv4(1, SIZE, WAYS, filters=4, blocks=2), False),
}


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("name", BOTH)
def test_batched_layers_and_torch_func_path_agree(name: str, first_order: bool) -> None:
    torch.manual_seed(3)
    build, regression = BOTH[name]
    model = build().to(DTYPE)
    batch = batch_for(regression)
    task_loss = regression_loss() if regression else classification_loss()
    params = dict(model.named_parameters())
    results = []
    for engine in (BatchedEngine(model), FuncEngine(model)):
        fast = per_task(params, T)
        for _ in range(3):
            fast = engine.step(
                task_loss, fast, batch.support_x, batch.support_y, LR, not first_order
            )
        loss = task_loss.loss(engine.forward(fast, batch.query_x), batch.query_y).mean()
        results.append(list(torch.autograd.grad(loss, list(params.values()))))
    assert isinstance(engine_for(model), BatchedEngine)
    assert_same(results[1], results[0], list(params), 1e-10)


# ------------------------------------------------------------------ buffers and randomness


def test_batch_norm_uses_each_tasks_batch_statistics_and_leaves_running_stats_alone() -> None:
    model = make("batchnorm_conv")
    model.eval()  # even in eval mode: the paper's transductive batch norm
    before = {n: b.clone() for n, b in model.named_buffers()}
    batch = batch_for(False)
    maml = MAML(model, classification_loss(), inner_lr=LR, inner_steps=2)
    maml.outer_loss(dict(model.named_parameters()), batch).backward()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    norm = model.features[1]
    assert not norm.training and norm.track_running_stats  # restored after the call
    x = batch.query_x
    out = engine_for(model).forward(per_task(dict(model.named_parameters()), T), x)
    model.train()
    ref = torch.stack([copy.deepcopy(model)(x[t]) for t in range(T)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_dropout_differs_per_task_and_repeats_under_the_same_seed() -> None:
    model = NormConv(1, SIZE, WAYS, "layer", dropout=0.5).to(DTYPE)
    x = torch.randn(1, 6, 1, SIZE, SIZE, dtype=DTYPE).expand(T, -1, -1, -1, -1)
    params = per_task(dict(model.named_parameters()), T)
    engine = engine_for(model)
    torch.manual_seed(7)
    first = engine.forward(params, x)
    assert (first[0] - first[1]).abs().max() > 1e-3  # same weights and inputs, other masks
    torch.manual_seed(7)
    torch.testing.assert_close(engine.forward(params, x), first, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(engine.forward(params, x)[0], model(x[0]), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- by config


CUSTOM = ["task=sinusoid", "model=custom", "model._target_=tests.nets.ResidualMLP"]
SMALL = ["device=cpu", "eval.num_tasks=4", "trainer.val_tasks=4", "trainer.meta_batch_size=3"]


def test_custom_model_builds_with_its_kwargs_and_takes_a_meta_step() -> None:
    cfg = make_config([*CUSTOM, *SMALL, "model.width=12", "model.blocks=3"])
    with build(cfg) as job:
        assert isinstance(job.model, ResidualMLP)
        assert job.model.stem.in_features == 1 and job.model.head.out_features == 1  # the task's
        assert len(job.model.blocks) == 3 and job.model.stem.out_features == 12
        assert isinstance(engine_for(job.model), FuncEngine)
        before = {n: p.detach().clone() for n, p in job.params.items()}
        loss = job.update(0)
        assert torch.isfinite(loss)
        assert any(not torch.equal(before[n], p) for n, p in job.params.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model._target_=tests.nope.Net"], r"^model._target_=tests.nope.Net: cannot import it"),
        (["model._target_=math.pi"], r"^model._target_=math.pi: not an nn.Module class"),
        (["model._target_=math.sqrt"], r"^model._target_=math.sqrt: cannot build it"),
        (["model._target_=collections.OrderedDict"], r"gave a OrderedDict, not an nn.Module"),
        (["model.widht=3"], r"^model._target_=tests.nets.ResidualMLP: cannot build it .*widht"),
    ],
    ids=["import_error", "not_callable", "type_error", "not_a_module", "bad_kwarg"],
)
def test_a_wrong_custom_model_is_refused_in_one_line(overrides: list[str], message: str) -> None:
    cfg = make_config([*CUSTOM, *SMALL, *overrides])
    with pytest.raises(UserError, match=message) as err:
        build(cfg)
    assert "\n" not in str(err.value)


def test_target_on_another_model_is_refused_and_typos_in_known_models_too() -> None:
    cfg = make_config([*SMALL, "+model._target_=tests.nets.ResidualMLP"])
    with pytest.raises(UserError, match=r"^model._target_=tests.nets.ResidualMLP: only model=cus"):
        build(cfg)
    with pytest.raises(Exception, match=r"hiden"):
        make_config(["model.hiden=[3]"])


def test_custom_model_end_to_end_keeps_the_users_parameter_names(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maml_runner",
            *CUSTOM,
            "trainer.steps=20",
            "trainer.val_every=10",
            "eval.num_tasks=5",
            "logger.mode=disabled",
            "trainer.progress=false",
            "device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "model ResidualMLP: torch.func path, because ResidualMLP" in done.stdout
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    expected = {n: tuple(p.shape) for n, p in ResidualMLP([1], 1).state_dict().items()}
    assert {n: tuple(p.shape) for n, p in state["model"].items()} == expected
    assert "norms.0.weight" in expected and "blocks.1.bias" in expected
    assert (run_dir / "metrics.json").is_file()
