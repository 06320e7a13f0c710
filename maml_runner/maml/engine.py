"""How a model runs with per-task weights: the batched layers, or ``torch.func`` for any module.

An engine does two things for ``adapt`` and the meta-objectives: ``forward(params, x)`` evaluates
the model on ``x`` ``[T, N, ...]`` with weights ``params[name]`` ``[T, *shape]``, and
``step(...)`` takes one inner gradient step on every task. ``engine_for(model)`` chooses once per
model (and remembers the choice):

* ``BatchedEngine`` when every module is a layer ``functional.BATCHED_LAYERS`` knows and none
  overrides that layer's ``forward``: one batched kernel per layer for all tasks, the fast path.
* ``FuncEngine`` otherwise: each task's forward is the module's own ``forward`` through
  ``torch.func.functional_call``, vectorised over tasks with ``torch.func.vmap``. Inner gradients
  come from ``torch.func.grad`` *inside* the vmap, which is exact per task; summing per-task
  losses and differentiating once (``inner_update``) is exact for the batched layers but, through
  vmapped batch or layer norm, gives second-order meta-gradients off by ~1e-3 relative.
  ``torch.func.grad`` alone is not enough either (torch 2.13, CPU, float64): the derivative of
  the vmapped backward of affine ``F.layer_norm`` / ``F.batch_norm`` is off by ~1e-3..4e-2
  relative (GroupNorm is exact). So a second-order inner step computes those two functions in
  their composite form (mean, biased variance, scale, shift; ``_CompositeNorms``), which is
  exact; the modules' own ``forward`` still runs, only the kernel behind the functional changes.

Batch norm on the torch.func path normalises each task with its own batch statistics (the
paper's transductive batch norm, as the batched layers do): every batch-norm module runs in
training mode without its running statistics, which are neither read nor updated. Modules with
randomness (dropout) draw different numbers for every task (``vmap(randomness="different")``)
from the global torch RNG, which a run seeds and a checkpoint saves and restores, so a run is
reproducible and resumes exactly. Dropout follows the model's ``training`` flag.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from maml_runner.maml.functional import Params, batched_forward, unsupported
from maml_runner.tasks.losses import TaskLoss

# An inner step size: one float for every weight (MAML), or by name a tensor broadcastable to the
# weight (Meta-SGD's α per element, MAML++'s per-layer rate); weights not named are held fixed
# in that step (ANIL's body), though the forward still uses them.
StepSize = float | Mapping[str, Tensor | float]


def _rates(params: Params, lr: StepSize) -> Mapping[str, Tensor | float]:
    return dict.fromkeys(params, lr) if isinstance(lr, (int, float)) else lr


def _moved(params: Params, grads: Mapping[str, Tensor], rates: Mapping[str, Tensor | float]):
    """θ'ᵢ = θᵢ − rate ⊙ gradient for the named weights; the others as they were."""
    out = dict(params)
    for n, rate in rates.items():
        if isinstance(rate, Tensor):
            out[n] = params[n] - rate * grads[n]
        else:  # a plain float: torch.add, as MAML always took it (bit-identical)
            out[n] = torch.add(params[n], grads[n], alpha=-rate)
    return out


class Engine(Protocol):
    """Runs one model with a set of weights per task (see the module docstring)."""

    description: str

    def forward(self, params: Params, x: Tensor) -> Tensor: ...

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
    ) -> Params: ...


def inner_update(
    per_task_loss: Callable[[Params], Tensor], params: Params, lr: StepSize, create_graph: bool
) -> Params:
    """One inner gradient step θ'ᵢ = θᵢ − α∇L_i(θᵢ) for every task at once.

    ``per_task_loss(params)`` returns each task's loss ``[T]``; summing them makes the gradient
    with respect to ``params[..][t]`` that of task t alone. With ``create_graph`` the result stays
    a differentiable function of ``params`` (and of a learned step size) through the gradient
    itself (second order); without it the gradient is a constant, so dθ'ᵢ/dθ = I: first order.
    ``lr`` as ``StepSize``: only the weights it names are moved (and differentiated).
    """
    rates = _rates(params, lr)
    grads = torch.autograd.grad(
        per_task_loss(params).sum(), [params[n] for n in rates], create_graph=create_graph
    )
    return _moved(params, dict(zip(rates, grads)), rates)


class BatchedEngine:
    """The batched layers: ``batched_forward`` and one ``autograd.grad`` over all tasks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.description = f"model {type(model).__name__}: batched layers"

    def forward(self, params: Params, x: Tensor) -> Tensor:
        return batched_forward(self.model, params, x)

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
    ) -> Params:
        def support_loss(p: Params) -> Tensor:
            return task_loss.loss(batched_forward(self.model, p, x), y)

        return inner_update(support_loss, params, lr, create_graph)


class FuncEngine:
    """Any module, by its own ``forward``: ``functional_call`` per task under ``vmap``.

    Args:
        model: the module; its buffers are shared by all tasks, its parameters replaced by
            ``params`` (names missing from ``params`` keep the module's own tensors).
        reason: why the batched layers cannot run it (for ``description``).
    """

    def __init__(self, model: nn.Module, reason: str = "chosen") -> None:
        self.model = model
        self.description = f"model {type(model).__name__}: torch.func path, because {reason}"
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @contextmanager
    def _per_task_batch_norm(self) -> Iterator[None]:
        """Batch norm on each task's own batch statistics; running statistics left alone."""
        saved = [(m, m.training, m.track_running_stats) for m in self._norms]
        try:
            for m in self._norms:
                m.training, m.track_running_stats = True, False
            yield
        finally:
            for m, training, track in saved:
                m.training, m.track_running_stats = training, track

    def _one(self, params: Params, x: Tensor) -> Tensor:
        """One task's forward (unbatched ``x`` ``[N, ...]``), by the module's own ``forward``."""
        return functional_call(self.model, {**dict(self.model.named_buffers()), **params}, (x,))

    def forward(self, params: Params, x: Tensor) -> Tensor:
        with self._per_task_batch_norm():
            return vmap(self._one, randomness="different")(params, x)

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
    ) -> Params:
        rates = _rates(params, lr)

        def loss(moved: Params, held: Params, x: Tensor, y: Tensor) -> Tensor:
            pred = self._one({**held, **moved}, x).unsqueeze(0)
            return task_loss.loss(pred, y.unsqueeze(0)).squeeze(0)

        # First order: the gradient is a constant (dθ'ᵢ/dθ = I), so take it at detached weights
        # and build no graph through it; second order keeps torch.func.grad's graph in θ.
        at = params if create_graph else {n: w.detach() for n, w in params.items()}
        moved = {n: at[n] for n in rates}
        held = {n: w for n, w in at.items() if n not in rates}
        with self._per_task_batch_norm(), _CompositeNorms() if create_graph else nullcontext():
            grads = vmap(grad(loss), randomness="different")(moved, held, x, y)
        return _moved(params, grads, rates)


def _layer_norm(
    x: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(-len(normalized_shape), 0))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


def _batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    """Training-mode batch norm on batch statistics alone; None for any other mode."""
    if not training or running_mean is not None or running_var is not None:
        return None
    dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
    mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    out = out if weight is None else out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


class _CompositeNorms(TorchFunctionMode):
    """``F.layer_norm`` and training-mode ``F.batch_norm`` as composite ops (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.batch_norm:
            out = _batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


_ENGINES: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()


def use_engine(model: nn.Module, engine: Engine) -> Engine:
    """Run ``model`` on ``engine`` from now on, instead of the automatic choice.

    For comparisons of the two paths (``scripts/bench --general-path``: the torch.func path on
    a model the batched layers also cover); a run never calls it.
    """
    _ENGINES[model] = engine
    return engine


def engine_for(model: nn.Module) -> Engine:
    """The engine that runs ``model``, chosen on first use and kept for the model's lifetime.

    The batched layers when ``functional.unsupported(model)`` finds nothing, else the torch.func
    path (``description`` says which and why). Changing a model's modules after its first use
    does not change the choice.
    """
    engine = _ENGINES.get(model)
    if engine is None:
        reason = unsupported(model)
        engine = BatchedEngine(model) if reason is None else FuncEngine(model, reason)
        _ENGINES[model] = engine
    return engine
