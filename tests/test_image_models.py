"""Conv and batch-norm layers in the batched engine, against per-task references in float64.

Batch norm is where a shortcut goes wrong: ``vmap(task_loss)(params).mean().backward()`` gives
second-order meta-gradients off by ~1e-3 for layers feeding batch norm (measured on torch 2.13
CPU and 2.11 CUDA). The engine does not use vmap; these tests pin its meta-gradients with batch
norm in the net to a plain per-task loop and to finite differences.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from maml_runner.maml import MAML, TaskBatch, batched_forward, classification_loss, per_task
from maml_runner.memory import keep_freed_memory
from maml_runner.models import MLP, Conv4
from maml_runner.trainer import auto_tasks_per_pass, meta_backward

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


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_in_passes_equals_one_pass(first_order: bool) -> None:
    name = "conv4-stride-mean"
    model, batch = make(name), image_batch(name)
    maml = MAML(model, classification_loss(), inner_lr=0.3, inner_steps=2, first_order=first_order)
    params = dict(model.named_parameters())
    results = {}
    for per_pass in (None, 1, 2):  # T = 3: passes of 3, of 1+1+1, and of 2+1 tasks
        for p in params.values():
            p.grad = None
        loss = meta_backward(maml, params, batch, per_pass, scale=0.5)
        results[per_pass] = loss, {n: p.grad.clone() for n, p in params.items()}
    torch.testing.assert_close(results[None][0], 0.5 * maml.outer_loss(params, batch).detach())
    for per_pass in (1, 2):
        torch.testing.assert_close(results[per_pass][0], results[None][0], rtol=1e-12, atol=0)
        for n, g in results[per_pass][1].items():
            torch.testing.assert_close(g, results[None][1][n], rtol=1e-10, atol=1e-13, msg=n)


def test_auto_tasks_per_pass_keeps_cpu_passes_cache_sized() -> None:
    def tasks(x_shape: tuple[int, ...], ways: int, shot: int, num_tasks: int, device="cpu"):
        xs = torch.zeros(num_tasks, ways * shot, *x_shape, device=device)
        xq = torch.zeros(num_tasks, ways * 15, *x_shape, device=device)
        y = torch.zeros(num_tasks, 1, dtype=torch.long, device=device)
        return TaskBatch(xs, y, xq, y)

    omniglot = Conv4(1, 28, 5)  # largest activation 64×14×14 floats: 50 KB an image
    assert auto_tasks_per_pass(omniglot, tasks((1, 28, 28), 5, 1, 32)) == 8  # 80 images a task
    # 20-way: 320 images a task, 16 MB: two tasks a pass stay within 32 MiB
    assert auto_tasks_per_pass(Conv4(1, 28, 20), tasks((1, 28, 28), 20, 1, 16)) == 2
    mini = Conv4(3, 84, 5, filters=32, downsample="max_pool", head="flatten")
    assert auto_tasks_per_pass(mini, tasks((3, 84, 84), 5, 5, 2)) == 1
    sinusoid = MLP(1, 1, hidden=[40, 40])
    assert auto_tasks_per_pass(sinusoid, tasks((1,), 1, 10, 25)) == 25  # tiny: one pass
    # not a CPU (a GPU is launch-bound): one pass, whatever the size
    assert auto_tasks_per_pass(omniglot.to("meta"), tasks((1, 28, 28), 5, 1, 32, "meta")) == 32


FAULTS_PER_META_STEP = """
import resource, sys, torch
from maml_runner.maml import MAML, TaskBatch, classification_loss
from maml_runner.memory import keep_freed_memory
from maml_runner.models import Conv4
from maml_runner.trainer import meta_backward
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
x, y = torch.rand(2, 80, 1, 28, 28), torch.arange(5).repeat_interleave(16).repeat(2, 1)
batch = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
model = Conv4(1, 28, 5)
maml = MAML(model, classification_loss(), inner_lr=0.4, inner_steps=1)
params = dict(model.named_parameters())
for step in range(13):
    if step == 3:  # after three warm-up meta-steps
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    meta_backward(maml, params, batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10)
"""


def test_freed_host_memory_is_reused_not_faulted_anew() -> None:
    if not keep_freed_memory():  # this process too: the setting must take here
        pytest.skip("glibc's mallopt is not available here")
    faults = {
        how: float(
            subprocess.run(
                [sys.executable, "-c", FAULTS_PER_META_STEP, how],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for how in ("default", "keep")
    }
    # measured: 5,000-13,000 page faults per meta-step with glibc's defaults; with the setting
    # 0 in most runs, in some a one-off heap growth of ~1,800 faults (up to 3% of the default)
    assert faults["keep"] < 0.1 * faults["default"], faults
