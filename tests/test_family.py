"""Meta-SGD, ANIL and MAML++ against per-task loops written from the papers' equations, float64.

Every reference loops over tasks with ``torch.func.functional_call`` and plain
``torch.autograd.grad`` and its own losses; none of it goes through an engine, ``per_task`` or
``maml_runner``'s losses, so a bug there cannot cancel out of a comparison. The batched layers
(an MLP; a conv net with batch norm) and the torch.func path (a residual MLP with layer norm; a
conv net with batch norm of its own forward) are both checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from maml_runner import app, checkpoint
from maml_runner.errors import InvalidArgument, UserError
from maml_runner.maml import MAML, TaskBatch
from maml_runner.maml.engine import engine_for
from maml_runner.maml.family import ANIL, MAMLpp, MetaSGD, head_names, msl_weights
from maml_runner.models import MLP, Conv4
from maml_runner.tasks.losses import classification_loss, regression_loss
from tests.helpers import QUICK, make_config, maml_run, read_metrics
from tests.nets import NormConv, ResidualMLP

DTYPE = torch.float64
T, WAYS, SHOT, QUERY, SIZE, LR = 3, 3, 2, 3, 8, 0.1

# name → (constructor, regression?, engine kind)
MODELS = {
    "mlp": (lambda: MLP(1, 1, hidden=[8, 8], activation="tanh"), True, "batched"),
    "conv4_bn": (
        lambda: Conv4(in_channels=1, image_size=SIZE, num_classes=WAYS, filters=4, blocks=2),
        False,
        "batched",
    ),
    "residual_mlp": (lambda: ResidualMLP([1], 1, width=8, blocks=2), True, "torch.func"),
    "batchnorm_conv": (lambda: NormConv(1, SIZE, WAYS, "batch"), False, "torch.func"),
}


def make(name: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().to(DTYPE)
    assert MODELS[name][2] in engine_for(model).description
    return model


def batch_for(regression: bool, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    if regression:
        xs, xq = (torch.randn(T, n, 1, generator=g, dtype=DTYPE) for n in (5, 7))
        return TaskBatch(xs, torch.sin(xs), xq, torch.sin(xq))
    xs = torch.randn(T, WAYS * SHOT, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    xq = torch.randn(T, WAYS * QUERY, 1, SIZE, SIZE, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat_interleave(SHOT).expand(T, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(T, -1)
    return TaskBatch(xs, ys, xq, yq)


def loss_of(regression: bool, pred: Tensor, y: Tensor) -> Tensor:
    return ((pred - y) ** 2).mean() if regression else F.cross_entropy(pred, y)


def task_loss(regression: bool):
    return regression_loss() if regression else classification_loss()


def reference_loss(model, params, batch, regression, steps, second, rate, at=None, weights=None):
    """Σₛ wₛ · mean over tasks of the query loss after step s+1 of θ ← θ − rate(n, s) ∘ ∇θ, by a
    loop over tasks. ``rate(n, s)`` None: n is held in step s. ``at(fast, s)``: the weights the
    forwards of step s use (BNWB). ``weights`` None: the last step's query loss alone."""
    at = at or (lambda fast, s: fast)
    total = torch.zeros((), dtype=DTYPE)
    for t in range(batch.num_tasks):
        fast = dict(params)
        for s in range(steps):
            use = at(fast, s)
            pred = functional_call(model, use, (batch.support_x[t],))
            loss = loss_of(regression, pred, batch.support_y[t])
            moved = [n for n in use if rate(n, s) is not None]
            grads = torch.autograd.grad(loss, [use[n] for n in moved], create_graph=second)
            fast = dict(use)
            for n, g in zip(moved, grads, strict=True):
                fast[n] = use[n] - rate(n, s) * g
            if weights is not None or s == steps - 1:
                pred = functional_call(model, at(fast, s), (batch.query_x[t],))
                w = 1.0 if weights is None else weights[s]
                total = total + w * loss_of(regression, pred, batch.query_y[t])
    return total / batch.num_tasks


def assert_same(ours: list[Tensor], ref: list[Tensor], rel: float = 1e-10) -> None:
    scale = max(b.abs().max().item() for b in ref)
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max().item() / scale <= rel


def copy_model(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """A reference copy (its batch norm may update running stats; the learner's must not)."""
    import copy

    ref = copy.deepcopy(model)
    return ref, dict(ref.named_parameters())


# ------------------------------------------------------------------------------- Meta-SGD


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_meta_gradient_matches_the_papers_update(name, steps, first_order) -> None:
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    learner = MetaSGD(
        model,
        task_loss(regression),
        inner_steps=steps,
        lr_init=[0.005, 0.1],
        first_order=first_order,
    )
    params, alpha = dict(model.named_parameters()), learner.learned.group("lr")
    assert all(
        0.005 <= a.min() and a.max() <= 0.1 and a.shape == params[n].shape for n, a in alpha.items()
    )
    inputs = [*params.values(), *alpha.values()]
    ours = torch.autograd.grad(learner.outer_loss(params, batch), inputs)

    ref_model, ref_params = copy_model(model)
    ref_alpha = {n: a.detach().clone().requires_grad_() for n, a in alpha.items()}
    ref = reference_loss(
        ref_model,
        ref_params,
        batch,
        regression,
        steps,
        not first_order,
        lambda n, s: ref_alpha[n],
    )
    assert_same(
        list(ours), list(torch.autograd.grad(ref, [*ref_params.values(), *ref_alpha.values()]))
    )


def test_metasgd_alpha_gradient_matches_central_finite_differences() -> None:
    model = make("mlp")
    batch = batch_for(True)
    learner = MetaSGD(model, regression_loss(), inner_steps=2, lr_init=[0.005, 0.1])
    params = dict(model.named_parameters())
    alpha = learner.learned.group("lr")
    grads = torch.autograd.grad(learner.outer_loss(params, batch), list(alpha.values()))
    eps = 1e-6
    checked = 0
    for (name, a), g in zip(alpha.items(), grads, strict=True):
        for index in [0, a.numel() - 1]:
            flat = a.data.view(-1)
            saved = flat[index].item()
            flat[index] = saved + eps
            up = learner.outer_loss(params, batch).item()
            flat[index] = saved - eps
            down = learner.outer_loss(params, batch).item()
            flat[index] = saved
            numeric = (up - down) / (2 * eps)
            assert g.view(-1)[index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), name
            checked += abs(numeric) > 1e-8
    assert checked >= 4, "the finite differences were all ~0: the test would prove nothing"


def test_metasgd_meta_test_adapts_with_the_learned_alpha() -> None:
    model = make("mlp")
    batch = batch_for(True)
    learner = MetaSGD(model, regression_loss(), inner_steps=1, lr_init=[0.02, 0.08])
    params = dict(model.named_parameters())
    predict = list(learner.adaptation(params, batch, 1))[1]
    ref_model, ref_params = copy_model(model)
    alpha = learner.learned.group("lr")
    for t in range(T):
        loss = loss_of(
            True, functional_call(ref_model, ref_params, (batch.support_x[t],)), batch.support_y[t]
        )
        grads = torch.autograd.grad(loss, list(ref_params.values()))
        fast = {
            n: p - alpha[n].detach() * g
            for (n, p), g in zip(ref_params.items(), grads, strict=True)
        }
        expected = functional_call(ref_model, fast, (batch.query_x[t],))
        torch.testing.assert_close(predict(batch.query_x)[t], expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- ANIL


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_matches_a_head_only_inner_loop(name, steps, first_order) -> None:
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    learner = ANIL(
        model, task_loss(regression), inner_lr=LR, inner_steps=steps, first_order=first_order
    )
    params = dict(model.named_parameters())
    head = set(learner.head)
    assert head and head < set(params)
    ours = torch.autograd.grad(learner.outer_loss(params, batch), list(params.values()))
    ref_model, ref_params = copy_model(model)
    ref = reference_loss(
        ref_model,
        ref_params,
        batch,
        regression,
        steps,
        not first_order,
        lambda n, s: LR if n in head else None,
    )
    expected = torch.autograd.grad(ref, list(ref_params.values()))
    assert_same(list(ours), list(expected))
    body = [g for n, g in zip(params, ours, strict=True) if n not in head]
    assert any(g.abs().max() > 0 for g in body), "the body is meta-learned by the outer loop"


@pytest.mark.parametrize("name", ["mlp", "residual_mlp"])
def test_anil_body_gets_no_inner_step_and_the_head_does(name) -> None:
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    learner = ANIL(model, task_loss(regression), inner_lr=LR, inner_steps=1)
    params = dict(model.named_parameters())
    predictors = list(learner.adaptation(params, batch, 2))
    fast = predictors[2].args[0]  # partial(engine.forward, fast)
    for n, p in params.items():
        moved = (fast[n] - p.detach()).abs().max().item()
        assert (moved > 0) == (n in learner.head), n


def test_anil_head_defaults_to_the_last_layer_and_names_are_checked() -> None:
    assert head_names(MLP(1, 1, hidden=[8, 8]), None) == ["4.weight", "4.bias"]
    conv = Conv4(in_channels=1, image_size=SIZE, num_classes=WAYS, filters=4, blocks=2)
    assert head_names(conv, None) == head_names(conv, ["8"]) == ["8.weight", "8.bias"]
    with pytest.raises(InvalidArgument, match="nope names no parameter"):
        head_names(conv, ["nope"])


# --------------------------------------------------------------------------------- MAML++


def mamlpp(model, regression, steps, **flags) -> MAMLpp:
    return MAMLpp(model, task_loss(regression), inner_lr=LR, inner_steps=steps, **flags)


@pytest.mark.parametrize("name", list(MODELS))
def test_mamlpp_with_every_flag_off_is_maml_exactly(name) -> None:
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    params = dict(model.named_parameters())
    for first_order in (False, True):
        maml = MAML(
            model, task_loss(regression), inner_lr=LR, inner_steps=3, first_order=first_order
        )
        plus = mamlpp(model, regression, 3, first_order=first_order)
        a, b = maml.outer_loss(params, batch), plus.outer_loss(params, batch)
        assert torch.equal(a, b)
        ga = torch.autograd.grad(a, list(params.values()))
        gb = torch.autograd.grad(b, list(params.values()))
        assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
        pa = [p(batch.query_x) for p in maml.adaptation(params, batch, 4)]
        pb = [p(batch.query_x) for p in plus.adaptation(params, batch, 4)]
        assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def test_msl_with_all_weight_on_the_last_step_is_maml() -> None:
    model = make("mlp")
    batch = batch_for(True)
    params = dict(model.named_parameters())
    maml = MAML(model, regression_loss(), inner_lr=LR, inner_steps=3)
    plus = mamlpp(model, True, 3, msl=True, msl_epochs=2, epoch_length=5)
    plus.at_iteration(10)  # epoch 2: the multi-step loss is over, the last step alone counts
    assert torch.equal(maml.outer_loss(params, batch), plus.outer_loss(params, batch))
    plus.at_iteration(9)  # epoch 1: every step counts
    assert not torch.equal(maml.outer_loss(params, batch), plus.outer_loss(params, batch))


def test_msl_weights_follow_the_authors_schedule() -> None:
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    w = msl_weights(5, 5, 10)  # each non-final weight falls by 1/(N·E) = 0.02 per epoch
    assert w == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6]) and sum(w) == pytest.approx(1)
    assert msl_weights(5, 9, 10)[:4] == pytest.approx([0.02] * 4)  # 0.2 − 0.18
    assert msl_weights(5, 200, 100_000)[:4] == pytest.approx([0.2 - 200 / 500_000] * 4)
    floor = msl_weights(5, 99, 100)  # the floor 0.03/N and the cap 1 − (N−1)·0.03/N
    assert floor == pytest.approx([0.006] * 4 + [1 - 4 * 0.006])
    assert msl_weights(5, 10, 10) is None


def test_lslr_with_frozen_equal_rates_is_maml() -> None:
    model = make("conv4_bn")
    batch = batch_for(False)
    params = dict(model.named_parameters())
    maml = MAML(model, classification_loss(), inner_lr=LR, inner_steps=3)
    plus = mamlpp(model, False, 3, lslr=True)
    assert all(
        torch.equal(lr, torch.full((3,), LR, dtype=DTYPE))
        for lr in plus.learned.group("lr").values()
    )
    a, b = maml.outer_loss(params, batch), plus.outer_loss(params, batch)
    torch.testing.assert_close(b, a, rtol=1e-13, atol=0)
    ga = torch.autograd.grad(a, list(params.values()))
    gb = torch.autograd.grad(b, list(params.values()))
    assert_same(list(gb), list(ga), rel=1e-12)


@pytest.mark.parametrize("name", ["conv4_bn", "batchnorm_conv"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_mamlpp_meta_gradient_matches_the_papers_inner_loop(name, steps, first_order) -> None:
    """MSL + LSLR + BNWB together against a per-task loop, with unequal learned rates and BN
    sets (so a wrong step index shows)."""
    model, regression = make(name), MODELS[name][1]
    batch = batch_for(regression)
    plus = mamlpp(
        model,
        regression,
        steps,
        first_order=first_order,
        msl=True,
        msl_epochs=4,
        lslr=True,
        bnwb=True,
        epoch_length=1,
    )
    plus.at_iteration(1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in plus.learned.parameters():
            p.mul_(torch.rand(p.shape, generator=g, dtype=DTYPE) + 0.5)
    params = dict(model.named_parameters())
    learned = dict(plus.learned.named_parameters())
    assert plus.bn_names and all(f"lr.{n}" not in learned for n in plus.bn_names)
    ours = torch.autograd.grad(
        plus.outer_loss(params, batch), [*params.values(), *learned.values()]
    )

    ref_model, ref_params = copy_model(model)
    ref_learned = {n: p.detach().clone().requires_grad_() for n, p in learned.items()}

    def rate(n: str, s: int):
        return None if n in plus.bn_names else ref_learned[f"lr.{n}"][s]

    def at(fast, s):  # step 0: the model's own BN weights; step s: learned set s − 1
        return (
            fast
            if s == 0
            else {**fast, **{n: ref_learned[f"bn.{n}"][s - 1] for n in plus.bn_names}}
        )

    weights = msl_weights(steps, 1, 4)
    ref = reference_loss(
        ref_model, ref_params, batch, regression, steps, not first_order, rate, at, weights
    )
    expected = torch.autograd.grad(
        ref, [*ref_params.values(), *ref_learned.values()], allow_unused=True
    )
    expected = [
        torch.zeros_like(p) if e is None else e
        for p, e in zip([*ref_params.values(), *ref_learned.values()], expected)
    ]
    ours = [torch.zeros_like(e) if o is None else o for o, e in zip(ours, expected)]
    assert_same(ours, expected)


def test_derivative_order_annealing_switches_from_first_to_second_order() -> None:
    model = make("mlp")
    batch = batch_for(True)
    params = dict(model.named_parameters())

    def grad(learner) -> list[Tensor]:
        return list(torch.autograd.grad(learner.outer_loss(params, batch), list(params.values())))

    first = grad(MAML(model, regression_loss(), inner_lr=LR, inner_steps=2, first_order=True))
    second = grad(MAML(model, regression_loss(), inner_lr=LR, inner_steps=2))
    plus = mamlpp(model, True, 2, da_epochs=3, epoch_length=10)
    plus.at_iteration(29)
    assert all(torch.equal(a, b) for a, b in zip(grad(plus), first, strict=True))
    plus.at_iteration(30)
    assert all(torch.equal(a, b) for a, b in zip(grad(plus), second, strict=True))


# ----------------------------------------------------------------- runs: resume, evaluate, CLI

FAMILY = {
    "metasgd": ["algorithm=metasgd"],
    "anil": ["algorithm=anil"],
    "mamlpp": [
        "algorithm=mamlpp",
        "algorithm.msl=true",
        "algorithm.lslr=true",
        "algorithm.da_epochs=1",
        "algorithm.msl_epochs=2",
        "algorithm.epoch_length=10",
        "inner.steps=2",
    ],
}


@pytest.mark.parametrize("algorithm", ["metasgd", "mamlpp"])
def test_resume_of_learned_meta_parameters_equals_an_uninterrupted_run(tmp_path, algorithm):
    whole, half = tmp_path / "whole", tmp_path / "half"
    common = [*QUICK, *FAMILY[algorithm]]
    app.run(make_config([*common, "trainer.steps=60"]), whole)
    app.run(make_config([*common, "trainer.steps=40"]), half)
    app.run(make_config([*common, "trainer.steps=60", f"resume={half}"]), half)
    a = checkpoint.load(whole / "checkpoints" / "last.pt")
    b = checkpoint.load(half / "checkpoints" / "last.pt")
    assert list(a["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert a["learned"] and all(k.startswith("lr.") for k in a["learned"])
    for part in ("model", "learned"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert read_metrics(whole)["meta_test"] == read_metrics(half)["meta_test"]
    # another algorithm's checkpoint is refused in one line, naming the difference
    with pytest.raises(UserError, match="learned meta-parameters differ"):
        app.run(make_config([*QUICK, "trainer.steps=80", f"resume={half}"]), half)


def test_best_checkpoint_selection_loads_the_learned_meta_parameters(tmp_path: Path) -> None:
    from maml_runner.build import build
    from maml_runner.trainer import FitResult

    with build(make_config([*QUICK, *FAMILY["metasgd"]])) as job:
        # what the trainer checks for NaN and torchrun broadcasts: θ and the learned α
        names = set(job.meta_parameters())
        assert set(job.params) < names and "learned.lr.0.weight" in names
        stepped = {id(p) for group in job.optimizer.param_groups for p in group["params"]}
        assert stepped == {id(p) for p in job.meta_parameters().values()}
        saver = checkpoint.Checkpointer(
            tmp_path, job.model, job.optimizer, {}, None, learned=job.learned
        )
        best = {"key": job.validation.key, "value": 0.5, "step": 20}
        saver.save_best(20, best, 1.0)
        saved = {n: p.detach().clone() for n, p in job.learned.named_parameters()}
        with torch.no_grad():
            for p in job.learned.parameters():
                p.add_(1.0)
        fitted = FitResult(
            step=40,
            interrupted=False,
            train_time=1.0,
            it_per_s=1.0,
            best=best,
            last_validation={**best, "step": 40},
        )
        assert job.select(fitted, tmp_path).checkpoint == "best"
        assert all(torch.equal(p, saved[n]) for n, p in job.learned.named_parameters())


@pytest.mark.parametrize("algorithm", list(FAMILY))
def test_each_algorithm_runs_from_the_cli_and_evaluate_reproduces_it(tmp_path, algorithm):
    run_dir = tmp_path / "run"
    maml_run(
        [
            *QUICK,
            "trainer.steps=20",
            "trainer.val_every=0",
            "eval.checkpoint=last",
            *FAMILY[algorithm],
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    metrics = read_metrics(run_dir)
    assert metrics["algorithm"] == algorithm
    maml_run(["evaluate", str(run_dir)], cwd=tmp_path)
    saved = json.loads(next((run_dir / "checkpoints").glob("eval_step20_*.json")).read_text())
    # the same θ and learned tensors on the same test tasks: the same figures
    tested = {k: v for k, v in metrics["meta_test"].items() if k not in ("checkpoint", "step")}
    assert saved["meta_test"] == tested
    assert all(math.isfinite(v) for v in metrics["meta_test"]["query_loss"]["mean"])


def test_the_family_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    bad = [
        (["algorithm=metasgd", "algorithm.lr_init=[0.1,0.01]"], "algorithm.lr_init=[0.1, 0.01]"),
        (["algorithm=anil", "algorithm.head=[nope]"], "algorithm.head=['nope']: nope names no"),
        (["algorithm=mamlpp", "inner.steps=0"], "inner.steps=0: must be an integer >= 1"),
        (
            ["algorithm=mamlpp", "algorithm.msl=true", "algorithm.msl_epochs=0"],
            "algorithm.msl_epochs=0: must be an integer >= 1",
        ),
        (
            ["task=nav2d", "experiment=finn17_nav2d", "algorithm=anil"],
            "algorithm=anil: RL tasks (task=nav2d)",
        ),
    ]
    for overrides, message in bad:
        proc = maml_run(
            [*QUICK, *overrides, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, check=False
        )
        assert proc.returncode == 2 and message in proc.stderr, (overrides, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_torchrun_all_reduces_the_learned_meta_parameters(tmp_path: Path) -> None:
    from tests.test_distributed import torchrun

    common = [
        "task=sinusoid",
        "seed=3",
        "trainer.meta_batch_size=5",
        *QUICK,
        "trainer.steps=20",
        "trainer.val_every=0",
        "eval.checkpoint=last",
        *FAMILY["metasgd"],
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    maml_run([*common, f"hydra.run.dir={one}"], cwd=tmp_path)
    torchrun([*common, f"hydra.run.dir={two}"], cwd=tmp_path)
    a = checkpoint.load(one / "checkpoints" / "last.pt")
    b = checkpoint.load(two / "checkpoints" / "last.pt")
    assert a["learned"].keys() == b["learned"].keys() and a["learned"]
    for part in ("model", "learned"):
        for name in a[part]:
            torch.testing.assert_close(b[part][name], a[part][name], rtol=0, atol=1e-5)
