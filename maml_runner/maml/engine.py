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
training mode without its running statistics, which are neither read nor updated. With per-step
statistics (``use_statistics``, MAML++'s BNRS; ``batch_norm.py``) both engines take the inner
step of the weights (``inner_step``): inside ``meta_training`` the layers still normalise with
batch statistics and each task's are recorded (a forward pre-hook on each batch-norm module,
returned out of the vmap); elsewhere the modules run in eval mode on the step's statistics,
passed as their ``running_mean`` and ``running_var``. Modules with
randomness (dropout) draw different numbers for every task (``vmap(randomness="different")``)
from the global torch RNG, which a run seeds and a checkpoint saves and restores, so a run is
reproducible and resumes exactly. Dropout follows the model's ``training`` flag.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from maml_runner.maml.batch_norm import StepStatistics, norm_layers
from maml_runner.maml.functional import Params, batched_forward, per_step_norms, unsupported
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
    statistics: StepStatistics | None  # per-step batch-norm statistics (BNRS); None: transductive

    def forward(self, params: Params, x: Tensor, inner_step: int = 0) -> Tensor: ...

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
        inner_step: int = 0,
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
        self.statistics: StepStatistics | None = None

    def forward(self, params: Params, x: Tensor, inner_step: int = 0) -> Tensor:
        """The model on ``x`` with ``params``, weights after ``inner_step`` inner steps (the
        index of per-step batch-norm statistics; unused by transductive batch norm)."""
        if self.statistics is None:
            return batched_forward(self.model, params, x)
        with per_step_norms(self.statistics, inner_step):
            return batched_forward(self.model, params, x)

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
        inner_step: int = 0,
    ) -> Params:
        def support_loss(p: Params) -> Tensor:
            return task_loss.loss(self.forward(p, x, inner_step), y)

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
        self._named_norms = norm_layers(model)
        self._norms = [m for _, m in self._named_norms]
        self.statistics: StepStatistics | None = None
        self._ran: list[str] = []  # the batch-norm layers of the last per-step forward, in order

    @contextmanager
    def _per_task_batch_norm(self) -> Iterator[None]:
        """Batch norm on each task's own batch statistics (or, with per-step statistics
        outside meta-training, in eval mode on them); the modules' own running statistics are
        left alone."""
        saved = [(m, m.training, m.track_running_stats) for m in self._norms]
        training = self.statistics is None or self.statistics.recording
        try:
            for m in self._norms:
                m.training, m.track_running_stats = training, False
            yield
        finally:
            for m, was_training, track in saved:
                m.training, m.track_running_stats = was_training, track

    def _one(self, params: Params, x: Tensor) -> Tensor:
        """One task's forward (unbatched ``x`` ``[N, ...]``), by the module's own ``forward``."""
        return functional_call(self.model, {**dict(self.model.named_buffers()), **params}, (x,))

    def _one_at(self, params: Params, x: Tensor, inner_step: int) -> tuple[Tensor, tuple]:
        """``_one`` with per-step statistics: meta-training returns each batch-norm forward's
        batch mean and unbiased variance beside the output (recorded after the vmap, which
        stacks them per task); otherwise the layers normalise with the step's statistics."""
        stats = self.statistics
        if not stats.recording:
            buffers = dict(self.model.named_buffers())
            for name, _ in self._named_norms:
                mean, var = stats.running(name, inner_step)
                prefix = f"{name}." if name else ""
                buffers[prefix + "running_mean"], buffers[prefix + "running_var"] = mean, var
            return functional_call(self.model, {**buffers, **params}, (x,)), ()
        seen: list[Tensor] = []
        names = {id(m): n for n, m in self._named_norms}

        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach()
            var, mean = torch.var_mean(h, dim=(0, *range(2, h.dim())), correction=1)
            seen.extend((mean, var))
            self._ran.append(names[id(module)])  # vmap and grad call this function once

        handles = [m.register_forward_pre_hook(hook) for m in self._norms]
        try:
            return self._one(params, x), tuple(seen)
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, inner_step: int, seen: tuple) -> None:
        """Hand the statistics ``_one_at`` returned (``[T, C]`` each, in the order the layers
        ran) to ``statistics``."""
        for i, name in enumerate(self._ran):
            self.statistics.record(name, inner_step, seen[2 * i], seen[2 * i + 1])

    def forward(self, params: Params, x: Tensor, inner_step: int = 0) -> Tensor:
        """The model on ``x`` with ``params``, weights after ``inner_step`` inner steps (the
        index of per-step batch-norm statistics; unused by transductive batch norm)."""
        if self.statistics is None:
            with self._per_task_batch_norm():
                return vmap(self._one, randomness="different")(params, x)
        self._ran = []
        with self._per_task_batch_norm():
            out, seen = vmap(self._one_at, in_dims=(0, 0, None), randomness="different")(
                params, x, inner_step
            )
        if seen:
            self._record(inner_step, seen)
        return out

    def step(
        self,
        task_loss: TaskLoss,
        params: Params,
        x: Tensor,
        y: Tensor,
        lr: StepSize,
        create_graph: bool,
        inner_step: int = 0,
    ) -> Params:
        rates = _rates(params, lr)
        stats = self.statistics

        def loss(moved: Params, held: Params, x: Tensor, y: Tensor) -> Tensor:
            pred = self._one({**held, **moved}, x).unsqueeze(0)
            return task_loss.loss(pred, y.unsqueeze(0)).squeeze(0)

        def loss_at(moved: Params, held: Params, x: Tensor, y: Tensor) -> tuple[Tensor, tuple]:
            pred, seen = self._one_at({**held, **moved}, x, inner_step)
            return task_loss.loss(pred.unsqueeze(0), y.unsqueeze(0)).squeeze(0), seen

        # First order: the gradient is a constant (dθ'ᵢ/dθ = I), so take it at detached weights
        # and build no graph through it; second order keeps torch.func.grad's graph in θ.
        at = params if create_graph else {n: w.detach() for n, w in params.items()}
        moved = {n: at[n] for n in rates}
        held = {n: w for n, w in at.items() if n not in rates}
        composite = _CompositeNorms() if create_graph else nullcontext()
        if stats is None:
            with self._per_task_batch_norm(), composite:
                grads = vmap(grad(loss), randomness="different")(moved, held, x, y)
            return _moved(params, grads, rates)
        self._ran = []
        with self._per_task_batch_norm(), composite:
            grads, seen = vmap(grad(loss_at, has_aux=True), randomness="different")(
                moved, held, x, y
            )
        if seen:
            self._record(inner_step, seen)
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


def use_statistics(model: nn.Module, statistics: StepStatistics) -> None:
    """Give ``model``'s batch norm per-step running statistics (BNRS, ``batch_norm.py``), on
    whichever engine runs it; without this call batch norm is transductive."""
    engine_for(model).statistics = statistics


def meta_training(model: nn.Module) -> AbstractContextManager[None]:
    """Around a learner's outer loss: with per-step statistics, the forwards inside use batch
    statistics and update the running ones (``StepStatistics.meta_training``); else nothing."""
    statistics = engine_for(model).statistics
    return nullcontext() if statistics is None else statistics.meta_training()


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
