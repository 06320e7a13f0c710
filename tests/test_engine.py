"""The MAML engine checked against independent references, in float64.

Every reference here is written per task with ``torch.func.functional_call`` and plain
``torch.autograd.grad``; none of it goes through ``batched_forward`` or ``adapt``, so a bug in the
batched engine cannot cancel out of a comparison.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from maml_runner.maml.core import MAML, Pretrain, adaptation_curve
from maml_runner.maml.functional import batched_forward, check_supported
from maml_runner.models.mlp import MLP
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import classification_loss, cross_entropy, regression_loss
from maml_runner.tasks.sinusoid import Sinusoid

DTYPE = torch.float64
NUM_TASKS = 4
K_SHOT = 5
QUERY = 7


# --------------------------------------------------------------------------------------- helpers


def make_model(activation: str = "tanh", seed: int = 0, hidden=(8, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(1, 1, hidden=hidden, activation=activation).to(DTYPE)


def sinusoid_batch(seed: int = 1, num_tasks: int = NUM_TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    b = Sinusoid().sample(num_tasks, g, k_shot=K_SHOT, query_size=QUERY)
    return TaskBatch(
        b.support_x.to(DTYPE), b.support_y.to(DTYPE), b.query_x.to(DTYPE), b.query_y.to(DTYPE)
    )


def shared_params(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters())


def task_mse(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Scalar MSE of one task, written independently of ``maml_runner.maml.losses``."""
    return ((functional_call(model, params, (x,)) - y) ** 2).mean()


def sgd_step(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, lr: float, create_graph: bool
) -> dict[str, Tensor]:
    loss = task_mse(model, params, x, y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}


def reference_second_order(
    model: nn.Module, params: dict[str, Tensor], batch: TaskBatch, lr: float, steps: int
) -> Tensor:
    """Hand-unrolled MAML outer loss: a Python loop over tasks, full graph through every step."""
    losses = []
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            fast = sgd_step(model, fast, batch.support_x[t], batch.support_y[t], lr, True)
        losses.append(task_mse(model, fast, batch.query_x[t], batch.query_y[t]))
    return torch.stack(losses).mean()


def reference_first_order_grad(
    model: nn.Module, params: dict[str, Tensor], batch: TaskBatch, lr: float, steps: int
) -> list[Tensor]:
    """FOMAML by definition: mean over tasks of ∇ L_query evaluated at θ'ᵢ as free variables."""
    total = [torch.zeros_like(p) for p in params.values()]
    for t in range(batch.num_tasks):
        fast = {n: p.detach().requires_grad_() for n, p in params.items()}
        for _ in range(steps):
            fast = sgd_step(model, fast, batch.support_x[t], batch.support_y[t], lr, False)
            fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
        loss = task_mse(model, fast, batch.query_x[t], batch.query_y[t])
        grads = torch.autograd.grad(loss, list(fast.values()))
        total = [a + g for a, g in zip(total, grads, strict=True)]
    return [a / batch.num_tasks for a in total]


def engine_grad(maml: MAML, params: dict[str, Tensor], batch: TaskBatch) -> tuple[Tensor, list]:
    loss = maml.outer_loss(params, batch)
    return loss, list(torch.autograd.grad(loss, list(params.values())))


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ------------------------------------------------------------------------------ batched forward


def _mlp_relu() -> nn.Module:
    return MLP(3, 2, hidden=(6, 5), activation="relu")


def _mlp_elu() -> nn.Module:
    return MLP(3, 2, hidden=(4,), activation="elu")


def _flatten_net() -> nn.Module:
    # Per-sample input [2, 3] → Flatten → 6 features; also a bias-free Linear.
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 2, bias=False), nn.Sigmoid()
    )


def _nested_net() -> nn.Module:
    # Linear applied to 4-D input [T, N, 2, 3] (the reshape path) inside a nested Sequential.
    return nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Identity(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("build", "sample_shape"),
    [(_mlp_relu, (3,)), (_mlp_elu, (3,)), (_flatten_net, (2, 3)), (_nested_net, (2, 3))],
    ids=["mlp_relu", "mlp_elu", "flatten", "nested_4d"],
)
def test_batched_forward_matches_functional_call_per_task(build, sample_shape):
    torch.manual_seed(0)
    model = build().to(DTYPE)
    g = torch.Generator().manual_seed(123)
    t, n = 3, 6
    # Genuinely different weights per task (not broadcast copies of one θ).
    params = {
        name: torch.randn(t, *p.shape, generator=g, dtype=DTYPE)
        for name, p in model.named_parameters()
    }
    x = torch.randn(t, n, *sample_shape, generator=g, dtype=DTYPE)

    out = batched_forward(model, params, x)

    refs = [
        functional_call(model, {name: w[i] for name, w in params.items()}, (x[i],))
        for i in range(t)
    ]
    ref = torch.stack(refs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # Tasks really do differ, so slicing the wrong task would fail the comparison above.
    assert (ref[0] - ref[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------ second-order MAML


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_unrolled_reference(steps, activation):
    model = make_model(activation)
    batch = sinusoid_batch()
    lr = 0.05
    params = shared_params(model)
    maml = MAML(model, regression_loss(), inner_lr=lr, inner_steps=steps)

    loss, grads = engine_grad(maml, params, batch)

    ref_loss = reference_second_order(model, params, batch, lr, steps)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))

    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name, gr, rr in zip(params, grads, ref_grads, strict=True):
        assert gr.shape == rr.shape, name
        torch.testing.assert_close(gr, rr, rtol=1e-10, atol=1e-12, msg=f"param {name}")
    assert flat(list(ref_grads)).abs().max() > 1e-4  # not a zero-vs-zero comparison


def outer_at(
    maml: MAML, params: dict[str, Tensor], batch: TaskBatch, name: str, idx: int, value: float
) -> float:
    """Set one scalar entry of ``params[name]`` in place and return the outer loss there."""
    with torch.no_grad():
        params[name].view(-1)[idx] = value
    return maml.outer_loss(params, batch).item()


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    model = make_model("tanh", seed=3)
    batch = sinusoid_batch(seed=4)
    lr = 0.1
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    maml = MAML(model, regression_loss(), inner_lr=lr, inner_steps=steps)
    fomaml = MAML(model, regression_loss(), inner_lr=lr, inner_steps=steps, first_order=True)

    _, grads = engine_grad(maml, params, batch)
    _, fo_grads = engine_grad(fomaml, params, batch)
    grads = dict(zip(params, grads, strict=True))
    fo_grads = dict(zip(params, fo_grads, strict=True))

    g = torch.Generator().manual_seed(7)
    names = list(params)
    eps = 1e-6
    analytic, numeric, first_order = [], [], []
    for _ in range(8):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        idx = int(torch.randint(params[name].numel(), (1,), generator=g))
        # outer_loss needs grad mode (the inner loop differentiates), so only the edits are no_grad.
        base = params[name].view(-1)[idx].item()
        plus = outer_at(maml, params, batch, name, idx, base + eps)
        minus = outer_at(maml, params, batch, name, idx, base - eps)
        outer_at(maml, params, batch, name, idx, base)
        numeric.append((plus - minus) / (2 * eps))
        analytic.append(grads[name].reshape(-1)[idx].item())
        first_order.append(fo_grads[name].reshape(-1)[idx].item())

    numeric_t = torch.tensor(numeric, dtype=DTYPE)
    analytic_t = torch.tensor(analytic, dtype=DTYPE)
    fo_t = torch.tensor(first_order, dtype=DTYPE)
    torch.testing.assert_close(analytic_t, numeric_t, rtol=1e-6, atol=1e-8)
    # The finite differences see the second-order term: FOMAML misses them by far more than tol.
    assert (fo_t - numeric_t).abs().max() > 1e-4


# ------------------------------------------------------------------------- first-order MAML


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_meta_gradient_matches_definition_and_differs_from_second_order(steps):
    model = make_model("tanh", seed=5)
    batch = sinusoid_batch(seed=6)
    lr = 0.1
    params = shared_params(model)
    fomaml = MAML(model, regression_loss(), inner_lr=lr, inner_steps=steps, first_order=True)
    maml = MAML(model, regression_loss(), inner_lr=lr, inner_steps=steps)

    fo_loss, fo_grads = engine_grad(fomaml, params, batch)
    so_loss, so_grads = engine_grad(maml, params, batch)
    ref = reference_first_order_grad(model, params, batch, lr, steps)

    for name, gr, rr in zip(params, fo_grads, ref, strict=True):
        torch.testing.assert_close(gr, rr, rtol=1e-10, atol=1e-12, msg=f"param {name}")
    # The forward value is the same objective either way; only the gradient differs.
    torch.testing.assert_close(fo_loss, so_loss, rtol=1e-12, atol=1e-12)
    diff = (flat(fo_grads) - flat(so_grads)).norm() / flat(so_grads).norm()
    assert diff > 1e-3, f"first-order gradient equals second-order (rel diff {diff:.2e})"


# ---------------------------------------------------------------------------- adaptation curve


def test_adaptation_curve_matches_manual_sgd_and_leaves_model_alone():
    model = make_model("relu", seed=8)
    batch = sinusoid_batch(seed=9)
    lr, steps = 0.05, 2
    params = shared_params(model)
    before = {n: p.detach().clone() for n, p in params.items()}

    learner = MAML(model, regression_loss(), inner_lr=lr, inner_steps=1)
    curve = adaptation_curve(learner, params, batch, steps=steps)

    assert torch.is_grad_enabled()
    assert set(curve) == {"loss"}
    loss = curve["loss"]
    assert loss.shape == (steps + 1, batch.num_tasks)
    assert not loss.requires_grad and loss.grad_fn is None

    expected = torch.empty(steps + 1, batch.num_tasks, dtype=DTYPE)
    for t in range(batch.num_tasks):
        fast = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        for s in range(steps + 1):
            expected[s, t] = task_mse(model, fast, batch.query_x[t], batch.query_y[t]).detach()
            if s < steps:
                fast = sgd_step(model, fast, batch.support_x[t], batch.support_y[t], lr, False)
                fast = {n: p.detach().requires_grad_() for n, p in fast.items()}

    # Step 0: the un-adapted query loss; step 1: one SGD step per task; step 2: two.
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert (loss[1] - loss[0]).abs().max() > 1e-4  # adaptation actually moved the weights

    for name, p in params.items():
        assert p.grad is None, name
        assert p.requires_grad, name
        assert torch.equal(p.detach(), before[name]), f"{name} was modified"


def test_adaptation_curve_reports_metrics():
    torch.manual_seed(10)
    model = MLP(3, 4, hidden=(6,)).to(DTYPE)
    g = torch.Generator().manual_seed(11)
    t, k, q = 3, 4, 9
    batch = TaskBatch(
        torch.randn(t, k, 3, generator=g, dtype=DTYPE),
        torch.randint(4, (t, k), generator=g),
        torch.randn(t, q, 3, generator=g, dtype=DTYPE),
        torch.randint(4, (t, q), generator=g),
    )
    params = shared_params(model)
    learner = MAML(model, classification_loss(), inner_lr=0.5, inner_steps=1)
    curve = adaptation_curve(learner, params, batch, steps=1)
    assert set(curve) == {"loss", "acc"}
    assert curve["acc"].shape == (2, t)

    logits = torch.stack([functional_call(model, params, (batch.query_x[i],)) for i in range(t)])
    acc0 = (logits.argmax(-1) == batch.query_y).to(DTYPE).mean(1)
    ce0 = torch.stack(
        [nn.functional.cross_entropy(logits[i], batch.query_y[i]) for i in range(t)]
    ).detach()
    torch.testing.assert_close(curve["acc"][0].to(DTYPE), acc0)
    torch.testing.assert_close(curve["loss"][0], ce0, rtol=1e-10, atol=1e-12)
    # Sanity: the engine's cross-entropy agrees with the reference too.
    torch.testing.assert_close(cross_entropy(logits, batch.query_y).detach(), ce0)


# ------------------------------------------------------------------------------------ Pretrain


def test_pretrain_outer_loss_is_mean_loss_on_support_and_query():
    model = make_model("relu", seed=12)
    batch = sinusoid_batch(seed=13)
    params = shared_params(model)

    loss = Pretrain(model, regression_loss(), inner_lr=0.01).outer_loss(params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))

    per_task = []
    for t in range(batch.num_tasks):
        x = torch.cat([batch.support_x[t], batch.query_x[t]])
        y = torch.cat([batch.support_y[t], batch.query_y[t]])
        per_task.append(task_mse(model, params, x, y))
    ref = torch.stack(per_task).mean()
    ref_grads = torch.autograd.grad(ref, list(params.values()))

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for name, gr, rr in zip(params, grads, ref_grads, strict=True):
        torch.testing.assert_close(gr, rr, rtol=1e-10, atol=1e-12, msg=f"param {name}")
    # Query-only or support-only losses differ from it, so the concatenation is really tested.
    query_only = torch.stack(
        [
            task_mse(model, params, batch.query_x[t], batch.query_y[t])
            for t in range(batch.num_tasks)
        ]
    ).mean()
    assert (query_only - ref).abs() > 1e-6


# ------------------------------------------------------------------------- unsupported layers


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * x


@pytest.mark.parametrize(
    ("model", "layer", "kind"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 3)), "1", "Conv1d"),
        (nn.Sequential(nn.Linear(1, 4), nn.ReLU(), Scale()), "2", "Scale"),
        (nn.Sequential(nn.Sequential(nn.Linear(1, 4), Scale())), "0.1", "Scale"),
        (Scale(), "<root>", "Scale"),
    ],
    ids=["conv1d", "custom", "nested_custom", "root_custom"],
)
def test_check_supported_rejects_unsupported_layer(model, layer, kind):
    with pytest.raises(TypeError, match=rf"layer {layer} is a {kind}\b"):
        check_supported(model)


def test_check_supported_accepts_supported_models():
    check_supported(MLP(1, 1, hidden=(4, 4), activation="elu"))
    check_supported(_flatten_net())
    check_supported(_nested_net())
