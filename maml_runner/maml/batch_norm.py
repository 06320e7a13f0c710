"""Which statistics batch norm normalises with: ``transductive`` or ``per_step`` (MAML++'s BNRS).

``transductive`` (the default; Finn et al.'s code): every batch-norm layer normalises each task
with that task's own batch statistics, at meta-training and at meta-test, and keeps no running
statistics. One query example's prediction then depends on the other query examples.

``per_step`` (BNRS, Antoniou et al. 2019 §4): every batch-norm layer keeps a running mean and
variance per inner step, index s for the weights after s inner steps (0..``inner_steps``; at
meta-test, steps beyond ``inner_steps`` reuse the last index, as MAML++'s other per-step sets
do). Meta-training normalises with each task's batch statistics, as the authors' code does, and
every batch-norm forward of the inner loop and the query updates its step's statistics as
``torch.nn.BatchNorm`` would in a loop over the tasks: ``r ← (1 − m)·r + m·x`` with the layer's
own momentum m, the batch mean and the unbiased batch variance, detached, task after task in
the meta-batch's order (within a task, in the order of its forwards). Validation and meta-test
normalise with the statistics of the step (no query example sees another).

The statistics are buffers of ``StepStatistics`` (an ``nn.Module``), which a learner keeps in its
``learned`` module as ``bn_stats``, so checkpoints save them, resume restores them and
``maml-run evaluate`` tests with them; they are not optimised. The engines read them
(``engine.use_statistics``); ``meta_training`` marks the forwards that update them.

References:
    Antoniou, Edwards & Storkey (2019), How to train your MAML, ICLR, arXiv:1810.09502, §4
    (BNRS: per-step batch normalization running statistics). The authors' code
    (HowToTrainYourMAMLPytorch, ``MetaBatchNormLayer``) keeps them per step but calls
    ``F.batch_norm(..., training=True)``, so there they never normalise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MODES = ("transductive", "per_step")

BatchNorm = nn.modules.batchnorm._BatchNorm


def norm_layers(model: nn.Module) -> list[tuple[str, BatchNorm]]:
    """The batch-norm layers of ``model`` by name (``nn.BatchNorm1d/2d/3d`` and subclasses)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BatchNorm)]


def _holder(root: nn.Module, name: str) -> nn.Module:
    """The submodule of ``root`` at dotted ``name``, made on the way (empty modules)."""
    module = root
    for part in name.split(".") if name else []:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module


class StepStatistics(nn.Module):
    """Running mean and variance of every batch-norm layer per inner step (see the module).

    Buffers ``<layer>.running_mean`` and ``<layer>.running_var`` of shape
    ``[inner_steps + 1, C]``, starting at 0 and 1 as torch's; on the model's device and dtype.

    Args:
        model: the model whose batch-norm layers get statistics.
        inner_steps: inner steps of meta-training (index 0..inner_steps).

    Raises:
        ValueError: the model has no batch-norm layer, or one whose momentum is None (a
            cumulative average, which has no per-step form here).
    """

    def __init__(self, model: nn.Module, inner_steps: int) -> None:
        super().__init__()
        layers = norm_layers(model)
        if not layers:
            raise ValueError("the model has no batch-norm layer")
        self.last = inner_steps
        self.momentum: dict[str, float] = {}
        like = next(model.parameters(), None)
        kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        for name, layer in layers:
            if layer.momentum is None:
                raise ValueError(
                    f"batch-norm layer {name} has momentum=None (a cumulative average); give "
                    f"it a momentum in (0, 1]"
                )
            self.momentum[name] = float(layer.momentum)
            shape = (inner_steps + 1, layer.num_features)
            holder = _holder(self, name)
            holder.register_buffer("running_mean", torch.zeros(shape, **kw))
            holder.register_buffer("running_var", torch.ones(shape, **kw))
        self._pending: list[tuple[str, int, Tensor, Tensor]] | None = None

    def index(self, inner_step: int) -> int:
        """The statistics index of the weights after ``inner_step`` steps."""
        return min(inner_step, self.last)

    def running(self, name: str, inner_step: int) -> tuple[Tensor, Tensor]:
        """Layer ``name``'s running mean and variance ``[C]`` for the weights after
        ``inner_step`` inner steps."""
        holder = self.get_submodule(name) if name else self
        s = self.index(inner_step)
        return holder.running_mean[s], holder.running_var[s]

    @property
    def recording(self) -> bool:
        """Inside ``meta_training``: forwards use batch statistics and record them."""
        return self._pending is not None

    def record(self, name: str, inner_step: int, mean: Tensor, var: Tensor) -> None:
        """One forward's per-task batch mean and unbiased variance ``[T, C]`` of layer ``name``."""
        if self._pending is not None:
            self._pending.append((name, self.index(inner_step), mean.detach(), var.detach()))

    @contextmanager
    def meta_training(self) -> Iterator[None]:
        """The forwards inside normalise with batch statistics and, on a normal exit, update
        the running statistics as a loop over the tasks would (the module docstring)."""
        self._pending = []
        try:
            yield
            self._update(self._pending)
        finally:
            self._pending = None

    @torch.no_grad()
    def _update(self, records: list[tuple[str, int, Tensor, Tensor]]) -> None:
        groups: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
        for name, s, mean, var in records:
            groups.setdefault((name, s), []).append((mean, var))
        for (name, s), values in groups.items():
            holder = self.get_submodule(name) if name else self
            m = self.momentum[name]
            for buffer, which in ((holder.running_mean, 0), (holder.running_var, 1)):
                # [forwards, T, C] → task-major sequence [T·forwards, C], as a per-task loop
                x = torch.stack([v[which] for v in values]).transpose(0, 1).flatten(0, 1)
                n = x.shape[0]
                # r_n = (1 − m)^n r_0 + Σ_k m (1 − m)^(n−1−k) x_k
                powers = torch.arange(n - 1, -1, -1, device=x.device, dtype=torch.float64)
                w = (m * (1 - m) ** powers).to(x.dtype)
                buffer[s] = (1 - m) ** n * buffer[s] + (w.unsqueeze(1) * x).sum(0)
