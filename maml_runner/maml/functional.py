"""Batched functional forward: run one network with a different set of weights per task.

``batched_forward(model, params, x)`` evaluates ``model`` on ``x`` of shape ``[T, N, ...]`` with
``params[name]`` of shape ``[T, *param.shape]`` (task ``t`` uses slice ``t``). The model stays a
plain ``nn.Module``: this module reads its structure and calls one batched kernel per layer
(``baddbmm`` for a linear layer, a grouped convolution for a conv layer), so a meta-batch costs
the same number of kernel launches as one task. That, not FLOPs, is what decides speed at
MAML's sizes, where each op costs 5-30 µs.

Image layers work on the ``[N, T*C, H, W]`` memory layout that a grouped convolution produces:
each layer takes ``[T, N, C, H, W]`` *views* of it, so convolution, batch norm, ReLU and pooling
chain without copies. Batch norm normalises each task with its own batch statistics (no running
averages), in training and at test, as the paper's reference code did: it is one
``F.batch_norm`` call over ``T*C`` channels. Inside ``per_step_norms`` (BNRS,
``batch_norm.py``) it records each task's batch statistics (meta-training) or normalises every
task with the inner step's running statistics (validation, meta-test).

Layers are dispatched on their type through ``BATCHED_LAYERS``; a model built from other layers
gets an error naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = dict[str, Tensor]
LayerFn = Callable[[nn.Module, Params, str, Tensor], Tensor]


def _linear(layer: nn.Linear, params: Params, prefix: str, x: Tensor) -> Tensor:
    weight = params[prefix + "weight"].transpose(1, 2)  # [T, in, out]
    shape = x.shape
    h = x if x.dim() == 3 else x.reshape(shape[0], -1, shape[-1])  # [T, N, in]
    if layer.bias is None:
        out = torch.bmm(h, weight)
    else:
        out = torch.baddbmm(params[prefix + "bias"].unsqueeze(1), h, weight)
    return out if x.dim() == 3 else out.reshape(*shape[:-1], weight.shape[2])


def _channels_last_task(x: Tensor) -> Tensor:
    """``[T, N, C, ...]`` → ``[N, T*C, ...]`` (a view when x came from a batched image layer)."""
    t, n, c = x.shape[:3]
    return x.transpose(0, 1).reshape(n, t * c, *x.shape[3:])


def _tasks_first(x: Tensor, num_tasks: int) -> Tensor:
    """``[N, T*C, ...]`` → a ``[T, N, C, ...]`` view."""
    n, tc = x.shape[:2]
    return x.view(n, num_tasks, tc // num_tasks, *x.shape[2:]).transpose(0, 1)


def _conv2d(layer: nn.Conv2d, params: Params, prefix: str, x: Tensor) -> Tensor:
    weight = params[prefix + "weight"]  # [T, O, C/g, kh, kw]
    t = weight.shape[0]
    bias = params.get(prefix + "bias") if layer.bias is not None else None
    out = F.conv2d(
        _channels_last_task(x),
        weight.reshape(-1, *weight.shape[2:]),
        None if bias is None else bias.reshape(-1),
        layer.stride,
        layer.padding,
        layer.dilation,
        groups=t * layer.groups,
    )
    return _tasks_first(out, t)


class StepNorms(Protocol):
    """Per-step running statistics of the batch-norm layers (``batch_norm.StepStatistics``)."""

    @property
    def recording(self) -> bool: ...

    def running(self, name: str, inner_step: int) -> tuple[Tensor, Tensor]: ...

    def record(self, name: str, inner_step: int, mean: Tensor, var: Tensor) -> None: ...


# The per-step statistics and inner step of the forward in progress (``per_step_norms``); None:
# transductive batch norm.
_STEP_NORMS: ContextVar[tuple[StepNorms, int] | None] = ContextVar("step_norms", default=None)


@contextmanager
def per_step_norms(norms: StepNorms, inner_step: int) -> Iterator[None]:
    """Batch norm in the forwards inside uses ``norms`` at ``inner_step`` (BNRS): records each
    task's batch statistics while ``norms.recording``, else normalises with the running ones."""
    token = _STEP_NORMS.set((norms, inner_step))
    try:
        yield
    finally:
        _STEP_NORMS.reset(token)


def _batch_norm(layer: nn.modules.batchnorm._BatchNorm, params: Params, prefix: str, x: Tensor):
    t = x.shape[0]
    weight = params.get(prefix + "weight") if layer.affine else None
    bias = params.get(prefix + "bias") if layer.affine else None
    norms = _STEP_NORMS.get()
    running = None
    if norms is not None:
        stats, inner_step = norms
        if stats.recording:  # meta-training: batch statistics, recorded per task
            dims = (1, *range(3, x.dim()))
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)
            stats.record(prefix[:-1], inner_step, mean, var)
        else:  # validation and meta-test: the step's running statistics, for every task
            mean, var = stats.running(prefix[:-1], inner_step)
            running = (mean.repeat(t), var.repeat(t))
    out = F.batch_norm(
        _channels_last_task(x),
        None if running is None else running[0],
        None if running is None else running[1],
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        training=running is None,
        eps=layer.eps,
    )
    return _tasks_first(out, t)


def _max_pool2d(layer: nn.MaxPool2d, params: Params, prefix: str, x: Tensor) -> Tensor:
    out = F.max_pool2d(
        _channels_last_task(x),
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        ceil_mode=layer.ceil_mode,
    )
    return _tasks_first(out, x.shape[0])


def _global_avg_pool(layer: nn.AdaptiveAvgPool2d, params: Params, prefix: str, x: Tensor):
    if layer.output_size not in (1, (1, 1)):
        raise TypeError(f"layer {prefix.rstrip('.')}: only AdaptiveAvgPool2d(1) is batched")
    return x.mean(dim=(-2, -1), keepdim=True)


def _pointwise(layer: nn.Module, params: Params, prefix: str, x: Tensor) -> Tensor:
    return layer(x)


def _flatten(layer: nn.Flatten, params: Params, prefix: str, x: Tensor) -> Tensor:
    # nn.Flatten's dims count from an unbatched sample [N, ...]; the task dim shifts them by one.
    start = layer.start_dim + 1 if layer.start_dim >= 0 else layer.start_dim
    end = layer.end_dim + 1 if layer.end_dim >= 0 else layer.end_dim
    return x.flatten(start, end)


def _sequential(layer: nn.Sequential, params: Params, prefix: str, x: Tensor) -> Tensor:
    for name, child in layer.named_children():
        x = _call(child, params, f"{prefix}{name}.", x)
    return x


BATCHED_LAYERS: dict[type[nn.Module], LayerFn] = {
    nn.Sequential: _sequential,
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.MaxPool2d: _max_pool2d,
    nn.AdaptiveAvgPool2d: _global_avg_pool,
    nn.Flatten: _flatten,
    nn.ReLU: _pointwise,
    nn.Tanh: _pointwise,
    nn.Sigmoid: _pointwise,
    nn.ELU: _pointwise,
    nn.LeakyReLU: _pointwise,
    nn.Identity: _pointwise,
}


def _call(layer: nn.Module, params: Params, prefix: str, x: Tensor) -> Tensor:
    kind = type(layer)
    for cls in kind.__mro__:
        fn = BATCHED_LAYERS.get(cls)
        if fn is not None:
            # A subclass with a forward of its own (a Sequential with a skip connection) must
            # run its own forward, never its parent's: refuse it (the torch.func path runs it).
            if cls is not kind and kind.forward is not cls.forward:
                raise TypeError(_refusal(layer, prefix, f"overrides {cls.__name__}.forward"))
            return fn(layer, params, prefix, x)
    raise TypeError(_refusal(layer, prefix, "is not a batched layer"))


def _refusal(layer: nn.Module, prefix: str, why: str) -> str:
    supported = ", ".join(sorted(c.__name__ for c in BATCHED_LAYERS))
    return (
        f"layer {prefix.rstrip('.') or '<root>'} is a {type(layer).__name__} that {why}; the "
        f"batched layers are {supported} (any other module runs on the torch.func path)"
    )


def _why_not(module: nn.Module) -> str | None:
    """Why the batched layers cannot run ``module`` itself (its children aside), or None."""
    kind = type(module)
    cls = next((c for c in kind.__mro__ if c in BATCHED_LAYERS), None)
    if cls is None:  # a layer torch ships, or a class of one's own (which has a forward)
        return (
            "is not a batched layer"
            if kind.__module__.startswith("torch.")
            else "overrides forward"
        )
    if cls is not kind and kind.forward is not cls.forward:
        return f"overrides {cls.__name__}.forward"
    if cls is nn.AdaptiveAvgPool2d and module.output_size not in (1, (1, 1)):
        return f"has output size {module.output_size} (only 1 is batched)"
    return None


def unsupported(model: nn.Module) -> str | None:
    """Why the batched layers cannot run ``model``, naming the first module that stops them.

    A module is covered when its class is, or derives from, a class in ``BATCHED_LAYERS``
    without overriding that class's ``forward``. Returns None when every module is covered.
    """
    for name, module in model.named_modules():
        why = _why_not(module)
        if why is not None:
            return f"{type(module).__name__} ({name or 'the model'}) {why}"
    return None


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` now, not mid-training, if ``model`` holds a layer we cannot batch."""
    for name, module in model.named_modules():
        why = _why_not(module)
        if why is not None:
            raise TypeError(_refusal(module, name + ".", why))


def batched_forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Evaluate ``model`` on ``x`` ``[T, N, ...]`` with per-task weights ``params`` ``[T, ...]``."""
    return _call(model, params, "", x)
