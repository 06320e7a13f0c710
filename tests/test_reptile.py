"""Reptile checked against the paper's equations written plainly, per task, in float64.

The references train a copy of the module itself (its own ``forward``, ``train()`` mode) with
``torch.optim.SGD`` / ``torch.optim.Adam`` one task at a time, then apply Algorithm 1
(serial: θ ← θ + ε(θ' − θ) after each task) or Algorithm 2 (batched: θ ← θ + ε(mean θ' − θ));
none of it goes through the engine, ``Reptile._train`` or ``InnerOptimizer``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_runner import app, checkpoint
from maml_runner.errors import UserError
from maml_runner.maml.core import adaptation_curve
from maml_runner.maml.engine import BatchedEngine, FuncEngine, engine_for
from maml_runner.maml.reptile import ORDER, Reptile, minibatch_order
from maml_runner.models import MLP, Conv4
from maml_runner.tasks.base import make_generator
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import classification_loss, regression_loss
from maml_runner.trainer import meta_backward
from tests.helpers import QUICK, make_config, read_metrics
from tests.nets import NormConv

DTYPE = torch.float64
TASKS, WAYS, SHOTS, QUERY = 4, 3, 4, 2  # 12 support examples per task, 6 query
STEPS, BATCH = 5, 5  # 25 > 12: minibatches straddle passes over the support set
EPSILON, LR = 0.7, 0.01


def image_batch(seed: int = 0, num_tasks: int = TASKS, size: int = 8) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def part(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(num_tasks, WAYS * per_class, 1, size, size, generator=g, dtype=DTYPE)
        y = torch.arange(WAYS).repeat_interleave(per_class).expand(num_tasks, -1)
        return x, y

    (sx, sy), (qx, qy) = part(SHOTS), part(QUERY)
    return TaskBatch(sx, sy, qx, qy)


def regression_batch(seed: int = 0, num_tasks: int = TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tasks, WAYS * SHOTS + QUERY, 1, generator=g, dtype=DTYPE)
    a = torch.rand(num_tasks, 1, 1, generator=g, dtype=DTYPE) + 0.5
    y = a * torch.sin(x)
    n = WAYS * SHOTS
    return TaskBatch(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


def conv4() -> nn.Module:  # the batched layers, with batch norm
    torch.manual_seed(0)
    return Conv4(1, 8, WAYS, filters=4, blocks=2).to(DTYPE)


def norm_conv() -> nn.Module:  # the torch.func path, with batch norm
    torch.manual_seed(0)
    return NormConv(1, 8, WAYS, norm="batch").to(DTYPE)


def mlp() -> nn.Module:  # the batched layers, no batch norm
    torch.manual_seed(0)
    return MLP(1, 1, hidden=[8, 8], activation="tanh").to(DTYPE)


MODELS = {"conv4": (conv4, image_batch), "norm_conv": (norm_conv, image_batch),
          "mlp": (mlp, regression_batch)}  # fmt: skip


def rounding_noise(model: nn.Module) -> set[str]:
    """Biases of convolutions right before batch norm: the normalisation cancels them, so their
    gradient is float rounding (~1e-17), which Adam divides by its own size into steps of ±lr
    in arbitrary directions (here and in torch.optim.Adam alike); they change no output."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            layers = list(module)
            for i, (a, b) in enumerate(zip(layers, layers[1:])):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.modules.batchnorm._BatchNorm):
                    names.add(f"{prefix}.{i}.bias".lstrip("."))
    return names


def loss_of(model: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """One task's mean loss, written independently of ``tasks.losses``."""
    return F.cross_entropy(out, y) if y.dtype == torch.long else ((out - y) ** 2).mean()


def learner(model: nn.Module, batch: TaskBatch, optimizer: str, **kw) -> Reptile:
    task_loss = classification_loss() if batch.support_y.dtype == torch.long else regression_loss()
    return Reptile(model, task_loss, inner_lr=LR, inner_steps=STEPS, inner_batch_size=BATCH,
                   eval_batch_size=BATCH, optimizer=optimizer, betas=(0.0, 0.999),
                   **kw)  # fmt: skip


def plain_train(model: nn.Module, x: Tensor, y: Tensor, order: Tensor, optimizer: str):
    """One task's θ' by the module and a torch optimiser (the paper's U^k_τ), per step."""
    net = copy.deepcopy(model).train()
    opt = (
        torch.optim.SGD(net.parameters(), lr=LR)
        if optimizer == "sgd"
        else torch.optim.Adam(net.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8)
    )
    for index in order:
        opt.zero_grad()
        loss_of(net, net(x[index]), y[index]).backward()
        opt.step()
        yield net


def with_order(batch: TaskBatch, seed: int = 5) -> TaskBatch:
    order = minibatch_order(batch.num_tasks, batch.support_x.shape[1], BATCH, STEPS,
                            make_generator(seed, torch.device("cpu")))  # fmt: skip
    return TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y,
                     {ORDER: order})  # fmt: skip


def reptile_step(model: nn.Module, rep: Reptile, batch: TaskBatch, per_pass: int | None) -> dict:
    """Our update: the pseudo-gradient into .grad (passes of ``per_pass``), outer SGD of ε."""
    net = copy.deepcopy(model)
    engine_for(net)  # a deepcopy is a new module: its engine is chosen like the original's
    rep.model = net
    params = dict(net.named_parameters())
    opt = torch.optim.SGD(net.parameters(), lr=EPSILON)
    meta_backward(rep, params, batch, per_pass)
    opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


# -------------------------------------------------------------------------- the update


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_update_matches_algorithm_2_per_task(name, optimizer):
    make, sample = MODELS[name]
    model, batch = make(), with_order(sample())
    expected_engine = FuncEngine if name == "norm_conv" else BatchedEngine
    assert isinstance(engine_for(model), expected_engine)
    rep = learner(model, batch, optimizer)

    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = []
    for t in range(batch.num_tasks):
        *_, net = plain_train(model, batch.support_x[t], batch.support_y[t],
                              batch.info[ORDER][t], optimizer)  # fmt: skip
        adapted.append(dict(net.named_parameters()))
    mean = {n: torch.stack([a[n].detach() for a in adapted]).mean(0) for n in theta}
    expected = {n: theta[n] + EPSILON * (mean[n] - theta[n]) for n in theta}

    ours = reptile_step(model, rep, batch, None)
    noise = rounding_noise(model) if optimizer == "adam" else set()
    assert len(noise) == (2 if name != "mlp" and optimizer == "adam" else 0)
    for n in set(theta) - noise:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)
    moved = max((expected[n] - theta[n]).abs().max().item() for n in theta)
    assert moved > 1e-4  # a real step, not zero against zero

    # passes of tasks (1, 3 + 1) give the one-pass update
    for per_pass in (1, 3):
        again = reptile_step(model, rep, batch, per_pass)
        for n in theta:
            torch.testing.assert_close(again[n], ours[n], rtol=1e-10, atol=1e-13, msg=n)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_serial_algorithm_1_is_a_meta_batch_of_one_repeated(optimizer):
    model, batch = conv4(), with_order(image_batch(seed=3))
    rep = learner(model, batch, optimizer)
    plain = copy.deepcopy(model)
    for t in range(batch.num_tasks):  # Algorithm 1: one task, then θ ← θ + ε(θ' − θ)
        *_, net = plain_train(plain, batch.support_x[t], batch.support_y[t],
                              batch.info[ORDER][t], optimizer)  # fmt: skip
        with torch.no_grad():
            for p, q in zip(plain.parameters(), net.parameters(), strict=True):
                p.add_(EPSILON * (q - p))
        model = copy.deepcopy(model)
        ours = reptile_step(model, rep, batch.tasks(t, t + 1), None)
        model.load_state_dict(ours, strict=False)
    noise = rounding_noise(model) if optimizer == "adam" else set()
    for n, p in plain.named_parameters():
        if n not in noise:
            ours = dict(model.named_parameters())[n]
            torch.testing.assert_close(ours, p, rtol=1e-10, atol=1e-12, msg=n)


def test_outer_loss_value_is_the_query_loss_after_adaptation():
    model, batch = mlp(), with_order(regression_batch())
    rep = learner(model, batch, "adam")
    value = rep.outer_loss(dict(model.named_parameters()), batch)
    expected = []
    for t in range(batch.num_tasks):
        *_, net = plain_train(model, batch.support_x[t], batch.support_y[t],
                              batch.info[ORDER][t], "adam")  # fmt: skip
        expected.append(loss_of(net, net(batch.query_x[t]), batch.query_y[t]))
    torch.testing.assert_close(value.detach(), torch.stack(expected).mean().detach())


def test_meta_training_without_a_minibatch_order_is_refused():
    model, batch = mlp(), regression_batch()
    with pytest.raises(ValueError, match="learner.ordered"):
        learner(model, batch, "sgd").outer_loss(dict(model.named_parameters()), batch)


def test_minibatch_order_passes_are_permutations_cut_into_batches():
    g = make_generator(0, torch.device("cpu"))
    order = minibatch_order(3, 4, 3, 5, g)  # 15 indices over 4 examples: 4 passes, cut
    assert order.shape == (3, 5, 3)
    flat = order.reshape(3, -1)
    for t in range(3):
        for p in range(3):  # the three whole passes
            assert sorted(flat[t, 4 * p : 4 * p + 4].tolist()) == [0, 1, 2, 3]
    assert not torch.equal(flat[0], flat[1])  # each task its own order
    again = minibatch_order(3, 4, 3, 5, make_generator(0, torch.device("cpu")))
    assert torch.equal(order, again)


# ------------------------------------------------------------------------------- meta-test


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("transductive", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_meta_test_adaptation_matches_a_plain_loop(name, transductive, optimizer):
    make, sample = MODELS[name]
    model, batch = make(), sample(seed=9)
    rep = learner(model, batch, optimizer, transductive=transductive, eval_seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    curve = adaptation_curve(rep, dict(model.named_parameters()), batch, steps=STEPS)
    order = minibatch_order(batch.num_tasks, batch.support_x.shape[1], BATCH, STEPS,
                            make_generator(4, torch.device("cpu")))  # fmt: skip

    def predict(net: nn.Module, t: int) -> Tensor:
        if transductive:  # all query examples at once
            return net(batch.query_x[t])
        rows = [net(torch.cat([batch.support_x[t], batch.query_x[t][j : j + 1]]))[-1]
                for j in range(batch.query_x.shape[1])]  # fmt: skip
        return torch.stack(rows)

    for t in range(batch.num_tasks):
        steps = plain_train(model, batch.support_x[t], batch.support_y[t], order[t], optimizer)
        nets = [copy.deepcopy(model).train()] + [copy.deepcopy(n) for n in steps]
        with torch.no_grad():
            losses = torch.stack([loss_of(n, predict(n, t), batch.query_y[t]) for n in nets])
        torch.testing.assert_close(curve["loss"][:, t], losses, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_non_transductive_differs_only_with_batch_norm():
    for make, sample, differs in ((conv4, image_batch, True), (mlp, regression_batch, False)):
        model, batch = make(), sample(seed=2)
        curves = [
            adaptation_curve(learner(model, batch, "adam", transductive=mode),
                             dict(model.named_parameters()), batch, steps=2)["loss"]
            for mode in (True, False)
        ]  # fmt: skip
        assert (not torch.equal(*curves)) == differs


# ----------------------------------------------------------------------- runs and configs

REPTILE = ["algorithm=reptile", "outer=sgd", "outer.lr=1.0", "inner.lr=0.001", "inner.steps=3",
           "algorithm.inner_batch_size=3", "algorithm.eval_batch_size=3", "inner.eval_steps=4",
           "eval.report_steps=[0,4]",
           "outer.scheduler={_target_:torch.optim.lr_scheduler.LinearLR,start_factor:1.0,"
           "end_factor:0.0,total_iters:60}"]  # fmt: skip


def _params(run_dir: Path) -> dict[str, Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["model"]


def test_reptile_run_resumes_exactly_and_anneals_to_zero(tmp_path: Path) -> None:
    whole, half = tmp_path / "whole", tmp_path / "half"
    app.run(make_config([*QUICK, *REPTILE, "trainer.steps=60"]), whole)
    app.run(make_config([*QUICK, *REPTILE, "trainer.steps=40"]), half)
    app.run(make_config([*QUICK, *REPTILE, "trainer.steps=60", f"resume={half}"]), half)
    a, b = _params(whole), _params(half)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(whole)["meta_test"] == read_metrics(half)["meta_test"]
    assert read_metrics(whole)["algorithm"] == "reptile" and read_metrics(whole)["first_order"]
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["meta_train/outer_lr"] for r in rows if "meta_train/outer_lr" in r]
    # ε_i = 1 − i/60 (the code's linear annealing to 0), averaged over each 10 logged steps
    assert lrs == pytest.approx([1 - (lo + 4.5) / 60 for lo in range(0, 60, 10)], rel=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.steps=0"], "inner.steps=0: must be an integer >= 1"),
        (["algorithm.inner_optimizer=rmsprop"], "algorithm.inner_optimizer=rmsprop: choose"),
        (["algorithm.inner_batch_size=0"], "algorithm.inner_batch_size=0: must be an integer"),
        (["algorithm.adam_beta1=1.0"], "algorithm.adam_beta1=1.0: an Adam β must lie"),
        (["task=nav2d", "model=gaussian_mlp", "outer=trpo"], "algorithm=reptile: .*RL"),
    ],
)
def test_bad_reptile_settings_are_refused_by_key(tmp_path, overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        app.run(make_config([*QUICK, "algorithm=reptile", *overrides]), tmp_path / "run")


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    """torchrun: 5 tasks over 2 ranks (3 + 2) move θ as one process does (the surrogate's
    gradient is the pseudo-gradient, so the existing weighted all-reduce averages it)."""
    from tests.helpers import maml_run
    from tests.test_distributed import torchrun, weights

    common = ["task=sinusoid", "seed=3", "trainer.meta_batch_size=5", *QUICK, *REPTILE]
    common = [o if o != "trainer.steps=40" else "trainer.steps=20" for o in common]
    one, two = tmp_path / "one", tmp_path / "two"
    maml_run([*common, f"hydra.run.dir={one}"], cwd=tmp_path)
    torchrun([*common, f"hydra.run.dir={two}"], cwd=tmp_path)
    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    assert json.loads((two / "metrics.json").read_text())["algorithm"] == "reptile"


def test_evaluate_a_reptile_run_gives_its_meta_test(tmp_path: Path) -> None:
    """``maml-run evaluate RUN`` rebuilds Reptile (its own config keys) and gets its numbers
    (up to float32 rounding: the subprocess may run on another number of threads)."""
    from tests.helpers import maml_run

    run = tmp_path / "run"
    app.run(make_config([*QUICK, *REPTILE, "eval.checkpoint=last", "algorithm.transductive=false",
                         "model.batch_norm=true"]), run)  # fmt: skip
    maml_run(["evaluate", str(run)], cwd=tmp_path)
    (saved,) = (run / "checkpoints").glob("eval_step40_*.json")
    evaluated = json.loads(saved.read_text())["meta_test"]
    tested = read_metrics(run)["meta_test"]
    assert evaluated["query_loss"]["mean"] == pytest.approx(tested["query_loss"]["mean"], rel=1e-6)
