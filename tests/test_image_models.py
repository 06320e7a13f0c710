"""Conv and batch-norm layers in the batched engine, against per-task references in float64.

Batch norm is where a shortcut goes wrong: ``vmap(task_loss)(params).mean().backward()`` gives
second-order meta-gradients off by ~1e-3 for layers feeding batch norm (measured on torch 2.13
CPU and 2.11 CUDA). The engine does not use vmap; these tests pin its meta-gradients with batch
norm in the net to a plain per-task loop and to finite differences.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from maml_runner.maml import MAML, TaskBatch, batched_forward, classification_loss, per_task
from maml_runner.models import MLP, Conv4

DTYPE = torch.float64
T, WAYS, SHOT, QUERY = 3, 3, 2, 2

MODELS = {
    "conv4-stride-mean": lambda: Conv4(1, 12, WAYS, filters=4, blocks=3),
    "conv4-maxpool-flatten": lambda: Conv4(
        3, 16, WAYS, filters=4, blocks=2, downsample="max_pool", head="flatten"
    ),
    "mlp-batchnorm": lambda: MLP(1 * 12 * 12, WAYS, hidden=[6, 5], batch_norm=True, flatten=True),
}


def image_batch(model_name: str, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 16, 16) if "maxpool" in model_name else (1, 12, 12)
    xs = torch.randn(T, WAYS * SHOT, *shape, generator=g, dtype=DTYPE)
    xq = torch.randn(T, WAYS * QUERY, *shape, generator=g, dtype=DTYPE)
    ys = torch.arange(WAYS).repeat_interleave(SHOT).expand(T, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(T, -1)
    return TaskBatch(xs, ys, xq, yq)


def make(name: str) -> nn.Module:
    torch.manual_seed(1)
    return MODELS[name]().to(DTYPE)


def per_task_weights(model: nn.Module, seed: int = 2) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: p.detach() + 0.1 * torch.randn(T, *p.shape, generator=g, dtype=DTYPE)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", MODELS)
def test_batched_forward_matches_each_task_alone(name: str) -> None:
    model, batch = make(name), image_batch(name)
    weights = per_task_weights(model)
    out = batched_forward(model, weights, batch.support_x)
    for t in range(T):
        ref = functional_call(model, {n: w[t] for n, w in weights.items()}, (batch.support_x[t],))
        torch.testing.assert_close(out[t], ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out[0], out[1]), "tasks must use their own weights"


def test_batch_norm_uses_each_tasks_own_statistics() -> None:
    model = make("conv4-stride-mean")
    batch = image_batch("conv4-stride-mean")
    shared = per_task(dict(model.named_parameters()), T)
    x = batch.support_x.clone()
    x[1] = x[1] * 10 + 3  # task 1's inputs shift and scale; task 0's outputs must not change
    torch.testing.assert_close(
        batched_forward(model, shared, x)[0], batched_forward(model, shared, batch.support_x)[0]
    )


def reference_meta_gradient(model: nn.Module, batch: TaskBatch, lr: float, steps: int):
    """Second-order MAML, one task at a time, with functional_call and autograd.grad."""
    params = dict(model.named_parameters())
    losses = []
    for t in range(T):
        fast = dict(params)
        for _ in range(steps):
            logits = functional_call(model, fast, (batch.support_x[t],))
            loss = nn.functional.cross_entropy(logits, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads)}
        logits = functional_call(model, fast, (batch.query_x[t],))
        losses.append(nn.functional.cross_entropy(logits, batch.query_y[t]))
    loss = torch.stack(losses).mean()
    return loss, torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_a_per_task_loop(name: str, steps: int) -> None:
    model, batch = make(name), image_batch(name)
    maml = MAML(model, classification_loss(), inner_lr=0.3, inner_steps=steps)
    params = dict(model.named_parameters())
    loss = maml.outer_loss(params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    ref_loss, ref_grads = reference_meta_gradient(model, batch, 0.3, steps)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name_, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11, msg=name_)


def test_meta_gradient_through_batch_norm_matches_finite_differences() -> None:
    name = "conv4-stride-mean"
    model, batch = make(name), image_batch(name)
    maml = MAML(model, classification_loss(), inner_lr=0.3, inner_steps=1)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(maml.outer_loss(params, batch), params.values())))
    first_order = MAML(model, classification_loss(), inner_lr=0.3, inner_steps=1, first_order=True)
    fo = dict(
        zip(params, torch.autograd.grad(first_order.outer_loss(params, batch), params.values()))
    )
    eps, checked, fo_gap = 1e-6, 0, 0.0
    # The first conv feeds batch norm: the layer where a vmap shortcut goes wrong.
    for key in ("0.weight", "1.weight", "3.weight"):
        for index in [(0, 0, 0, 0), (1, 0, 1, 2)] if params[key].dim() == 4 else [(0,), (2,)]:
            p = params[key]
            with torch.no_grad():
                p[index] += eps
            up = maml.outer_loss(params, batch).item()
            with torch.no_grad():
                p[index] -= 2 * eps
            down = maml.outer_loss(params, batch).item()
            with torch.no_grad():
                p[index] += eps
            numeric = (up - down) / (2 * eps)
            assert grads[key][index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), key
            fo_gap = max(fo_gap, abs(fo[key][index].item() - numeric))
            checked += 1
    assert checked == 6
    assert fo_gap > 1e-5, "first order should miss the second-order term somewhere"
