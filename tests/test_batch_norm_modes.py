"""``model.batch_norm_stats``: transductive batch norm (the default) and per-step running
statistics (MAML++'s BNRS), on the batched layers and the torch.func path, float64.

The reference for the running statistics is a plain loop over tasks through torch's own
``nn.BatchNorm`` (one copy of the model per inner step, in training mode with running
statistics), written from the definition; it never goes through an engine.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from maml_runner import app, checkpoint
from maml_runner.build import build
from maml_runner.errors import UserError
from maml_runner.maml import MAML, TaskBatch
from maml_runner.maml.batch_norm import StepStatistics, norm_layers
from maml_runner.maml.engine import engine_for, use_statistics
from maml_runner.maml.family import MAMLpp
from maml_runner.models import Conv4, ResNet12
from maml_runner.tasks.losses import classification_loss
from tests.helpers import QUICK, REPO, make_config, maml_run, read_metrics
from tests.nets import NormConv

DTYPE = torch.float64
T, WAYS, SHOT, QUERY, SIZE, LR, STEPS = 3, 3, 2, 4, 8, 0.1, 2

MODELS = {
    "conv4": (
        lambda: Conv4(in_channels=1, image_size=SIZE, num_classes=WAYS, filters=4, blocks=2),
        "batched",
    ),  # fmt: skip
    "batchnorm_conv": (lambda: NormConv(1, SIZE, WAYS, "batch"), "torch.func"),
    # torch.func path, batch norm without running statistics of its own
    "resnet12": (lambda: ResNet12(1, SIZE, WAYS, [2, 3], norm="batch"), "torch.func"),
}


def make(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().to(DTYPE)
    assert MODELS[name][1] in engine_for(model).description
    return model


def batch(seed: int) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, WAYS * SHOT, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    xq = torch.randn(T, WAYS * QUERY, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat_interleave(SHOT).expand(T, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(T, -1)
    return TaskBatch(xs, ys, xq, yq)


def learner_of(kind: str, model: nn.Module, per_step: bool) -> MAML:
    loss = classification_loss()
    if kind == "maml":
        learner = MAML(model, loss, inner_lr=LR, inner_steps=STEPS)
    else:  # MAML++ with the multi-step loss: query forwards after every step
        learner = MAMLpp(model, loss, inner_lr=LR, inner_steps=STEPS, msl=True, msl_epochs=5)
    if per_step:
        stats = StepStatistics(model, STEPS)
        use_statistics(model, stats)
        learner.learned.add_module("bn_stats", stats)
    return learner


def reference_copies(model: nn.Module) -> list[nn.Module]:
    """One copy of ``model`` per inner step whose batch norm is torch's, with running stats."""
    copies = []
    for _ in range(STEPS + 1):
        ref = copy.deepcopy(model).train()
        for _, m in norm_layers(ref):
            m.track_running_stats = True
            m.register_buffer("running_mean", torch.zeros(m.num_features, dtype=DTYPE))
            m.register_buffer("running_var", torch.ones(m.num_features, dtype=DTYPE))
            m.register_buffer("num_batches_tracked", torch.tensor(0))
        copies.append(ref)
    return copies


def reference_update(refs: list[nn.Module], theta: dict, b: TaskBatch, msl: bool) -> None:
    """The forwards of meta-training, task after task, each updating its step's copy."""
    for t in range(T):
        fast = {n: w.detach().clone().requires_grad_() for n, w in theta.items()}
        for s in range(STEPS):
            out = functional_call(refs[s], fast, (b.support_x[t],))
            loss = F.cross_entropy(out, b.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (w - LR * g).detach().requires_grad_()
                    for (n, w), g in zip(fast.items(), grads)}  # fmt: skip
            if msl or s == STEPS - 1:  # the query after s + 1 steps
                functional_call(refs[s + 1], fast, (b.query_x[t],))


@pytest.mark.parametrize("kind", ["maml", "mamlpp_msl"])
@pytest.mark.parametrize("name", list(MODELS))
def test_running_statistics_equal_a_per_task_loop(name: str, kind: str) -> None:
    model = make(name)
    own = {n: b.clone() for n, b in model.named_buffers()}
    learner = learner_of(kind, model, per_step=True)
    refs = reference_copies(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    for it in range(3):  # θ moves between meta-iterations
        b = batch(it)
        reference_update(refs, params, b, msl=kind != "maml")
        optimizer.zero_grad()
        learner.outer_loss(params, b).backward()
        optimizer.step()
    stats = learner.learned.bn_stats
    for layer, _ in norm_layers(model):
        for s in range(STEPS + 1):
            ref = refs[s].get_submodule(layer)
            mean, var = stats.running(layer, s)
            assert not torch.equal(ref.running_var, torch.ones_like(ref.running_var))
            torch.testing.assert_close(mean, ref.running_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(var, ref.running_var, rtol=1e-12, atol=1e-14)
    # the module's own running statistics are neither read nor updated
    assert all(torch.equal(b, own[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize("name", list(MODELS))
def test_passes_of_tasks_update_the_statistics_as_one(name: str) -> None:
    """``trainer.tasks_per_pass``: the passes' updates, in task order, are the whole batch's."""
    stats = []
    for passes in ([(0, T)], [(0, 2), (2, T)]):
        model = make(name)
        learner = learner_of("mamlpp_msl", model, per_step=True)
        params = dict(model.named_parameters())
        for lo, hi in passes:
            learner.outer_loss(params, batch(0).tasks(lo, hi))
        stats.append(learner.learned.bn_stats.state_dict())
    whole, parts = stats
    for key in whole:
        torch.testing.assert_close(whole[key], parts[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_training_normalises_as_transductive_batch_norm(name: str) -> None:
    """Per-step statistics change nothing in meta-training: the same loss and meta-gradient."""
    figures = []
    for per_step in (False, True):
        model = make(name)
        learner = learner_of("maml", model, per_step)
        params = dict(model.named_parameters())
        loss = learner.outer_loss(params, batch(0))
        figures.append((loss, torch.autograd.grad(loss, list(params.values()))))
    (a, ga), (b, gb) = figures
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("name", list(MODELS))
def test_per_step_meta_test_equals_a_per_task_loop(name: str) -> None:
    """Validation and meta-test: each task adapts (first order) and predicts through torch's
    batch norm in eval mode on the step's running statistics."""
    model = make(name)
    learner = learner_of("maml", model, per_step=True)
    params = dict(model.named_parameters())
    learner.outer_loss(params, batch(0))  # running statistics away from 0 and 1
    stats = learner.learned.bn_stats
    refs = reference_copies(model)
    for s, ref in enumerate(refs):
        ref.eval()
        for layer, m in norm_layers(ref):
            m.running_mean, m.running_var = (v.clone() for v in stats.running(layer, s))
    b, steps = batch(7), STEPS + 1  # one step beyond meta-training's: the last statistics
    predicted = [p(b.query_x) for p in learner.adaptation(params, b, steps)]
    for t in range(T):
        fast = {n: w.detach().clone().requires_grad_() for n, w in params.items()}
        for s in range(steps + 1):
            ref = refs[min(s, STEPS)]
            with torch.no_grad():
                out = functional_call(ref, fast, (b.query_x[t],))
            torch.testing.assert_close(predicted[s][t], out, rtol=1e-10, atol=1e-12)
            if s < steps:
                out = functional_call(ref, fast, (b.support_x[t],))
                loss = F.cross_entropy(out, b.support_y[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {n: (w - LR * g).detach().requires_grad_()
                        for (n, w), g in zip(fast.items(), grads)}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_per_step_meta_test_is_not_transductive(name: str) -> None:
    """A query example's prediction after 0..2 steps is unchanged when the other query
    examples change; with transductive batch norm it changes."""
    b = batch(5)
    other = b.query_x.clone()
    other[:, 1:] = torch.randn(other[:, 1:].shape, generator=torch.Generator().manual_seed(9),
                               dtype=DTYPE)  # fmt: skip
    for per_step in (True, False):
        model = make(name)
        learner = learner_of("maml", model, per_step)
        params = dict(model.named_parameters())
        learner.outer_loss(params, batch(0))  # running statistics away from 0 and 1
        for predict in learner.adaptation(params, b, steps=2):
            a, c = predict(b.query_x)[:, 0], predict(other)[:, 0]
            if per_step:
                torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
            else:
                assert not torch.allclose(a, c)


def test_steps_beyond_meta_training_reuse_the_last_statistics() -> None:
    model = make("conv4")
    stats = StepStatistics(model, STEPS)
    layer = norm_layers(model)[0][0]
    stats.get_submodule(layer).running_mean[STEPS] = 3.0
    assert torch.equal(stats.running(layer, STEPS + 4)[0], stats.running(layer, STEPS)[0])


# sinusoid runs: an MLP with batch norm (batched layers)
PER_STEP = [
    "model.batch_norm=true",
    "model.batch_norm_stats=per_step",
    "trainer.meta_batch_size=4",
    "inner.eval_steps=2",
    "eval.report_steps=[0,1,2]",
    "eval.checkpoint=last",
]


def test_per_step_statistics_resume_exactly_and_evaluate_uses_them(tmp_path: Path) -> None:
    whole, half = tmp_path / "whole", tmp_path / "half"
    app.run(make_config([*QUICK, *PER_STEP, "trainer.steps=40"]), whole)
    app.run(make_config([*QUICK, *PER_STEP, "trainer.steps=20"]), half)
    app.run(make_config([*QUICK, *PER_STEP, "trainer.steps=40", f"resume={half}"]), half)
    a = checkpoint.load(whole / "checkpoints" / "last.pt")["learned"]
    b = checkpoint.load(half / "checkpoints" / "last.pt")["learned"]
    assert sorted(a) == sorted(b) and "bn_stats.1.running_var" in a
    assert a["bn_stats.1.running_var"].shape == (2, 40)  # inner.steps + 1 sets of 40 channels
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(whole)["meta_test"] == read_metrics(half)["meta_test"]
    assert read_metrics(whole)["meta_val"] == read_metrics(half)["meta_val"]

    # evaluate: the saved statistics reproduce the run's meta-test; other statistics do not
    from maml_runner.cli import _evaluate

    _evaluate(whole, [], None, None, None, None, None)
    saved = json.loads(next((whole / "checkpoints").glob("eval_step*.json")).read_text())
    tested = read_metrics(whole)["meta_test"]
    tested = {k: v for k, v in tested.items() if k not in ("checkpoint", "step")}
    assert saved["meta_test"] == tested
    path = whole / "checkpoints" / checkpoint.LAST
    state = checkpoint.load(path)
    with build(make_config([*QUICK, *PER_STEP])) as job:
        job.load(state, str(path))
        mine = job.meta_test().result.mean["query_loss"]
        job.learned.bn_stats.get_submodule("1").running_var.fill_(1.0)
        assert job.meta_test().result.mean["query_loss"] != mine


def test_a_per_step_checkpoint_needs_per_step(tmp_path: Path) -> None:
    app.run(make_config([*QUICK, *PER_STEP, "trainer.steps=20", "trainer.val_every=0"]), tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    with build(make_config([*QUICK, "model.batch_norm=true"])) as job:
        with pytest.raises(UserError, match="per-step batch-norm statistics differ"):
            job.load(state, "here")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.batch_norm_stats=per_step"],
         "model.batch_norm_stats=per_step: the model has no batch-norm layer (model=mlp, MLP); "
         "choose transductive, or a model with batch norm (model.batch_norm=true)"),
        (["model.batch_norm=true", "model.batch_norm_stats=running"],
         "model.batch_norm_stats=running: choose one of transductive, per_step"),
        (["model.batch_norm=true", "model.batch_norm_stats=per_step", "algorithm=reptile",
          "outer=sgd"],
         "model.batch_norm_stats=per_step: not with algorithm=reptile (Reptile has its own"),
        (["model.batch_norm=true", "model.batch_norm_stats=per_step", "algorithm=pretrain"],
         "model.batch_norm_stats=per_step: not with algorithm=pretrain"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        build(make_config([*QUICK, *overrides]))
    assert str(err.value).startswith(message), str(err.value)


def test_a_custom_module_without_batch_norm_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = maml_run(
        [*QUICK, "model=custom", "model._target_=tests.nets.ResidualMLP",
         "model.batch_norm_stats=per_step", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=REPO, check=False,
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.getenv("PYTHONPATH")]))},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "model.batch_norm_stats=per_step: the model has no batch-norm layer" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_per_step_is_refused_under_torchrun_and_for_a_cumulative_momentum(monkeypatch) -> None:
    from maml_runner import build as build_module

    cfg = make_config([*QUICK, "model.batch_norm=true", "model.batch_norm_stats=per_step"])
    monkeypatch.setattr(build_module.distributed, "launched", lambda: True)
    with pytest.raises(UserError, match=r"^model.batch_norm_stats=per_step: not under torchrun"):
        build_module.validate(cfg)
    with pytest.raises(ValueError, match="batch-norm layer 1 has momentum=None"):
        StepStatistics(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, momentum=None)), 1)
