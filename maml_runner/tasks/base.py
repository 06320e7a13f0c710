"""Task streams for meta-training and fixed task sets for validation and meta-test.

The meta-batch of training step ``s`` is a pure function of ``(seed, s)``: tasks are drawn in
chunks of ``chunk`` meta-batches from a generator seeded by ``(seed, chunk index)``. One call
then samples many meta-batches (fewer ops per step), and a resumed run sees exactly the tasks an
uninterrupted run would, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from maml_runner.errors import positive_int
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss


@dataclass(frozen=True)
class TaskPlot:
    """How to draw a regression task: inputs on a grid, and each task's true outputs there."""

    grid: torch.Tensor  # [G, D]: the inputs at which a task's function is drawn
    truth: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]  # (info, x) → y


class TaskFamily(Protocol):
    """What every supervised task family declares (the trainer and the job rely on nothing else).

    ``input_shape``/``output_size`` size the model; ``task_loss`` is what adaptation and the
    meta-objective minimise (with the metrics to report); ``small`` says its tasks are tiny (a
    stream then draws 100 meta-batches per call and fixed sets stay in memory); ``task_plot``
    draws example tasks, or None (no task plot).
    """

    input_shape: tuple[int, ...]
    output_size: int
    small: bool

    @property
    def task_loss(self) -> TaskLoss: ...

    @property
    def task_plot(self) -> TaskPlot | None: ...

    def sample(
        self, num_tasks: int, generator: torch.Generator, *, k_shot: int, query_size: int
    ) -> TaskBatch:
        """Draw ``num_tasks`` tasks with ``k_shot`` support and ``query_size`` query examples."""
        ...


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def stream_seed(seed: int, chunk: int) -> int:
    """Generator seed of one training chunk: (seed, chunk) packed above 2**32.

    Validation and meta-test sets are seeded with small integers (``trainer.val_seed``,
    ``eval.seed``); packing the run seed into the high bits keeps the training stream from ever
    replaying them.
    """
    return (((seed % 2**31) + 1) << 32) + chunk


class TaskStream:
    """Meta-training batches: ``stream.batch(step)`` is the same for the same seed and step.

    Raises:
        InvalidArgument: ``meta_batch_size``, ``k_shot``, ``query_size`` or ``chunk`` is not an
            integer >= 1.
    """

    def __init__(
        self,
        family: TaskFamily,
        *,
        meta_batch_size: int,
        k_shot: int,
        query_size: int,
        seed: int,
        device: torch.device,
        chunk: int = 100,
    ) -> None:
        for name, value in (
            ("meta_batch_size", meta_batch_size),
            ("k_shot", k_shot),
            ("query_size", query_size),
            ("chunk", chunk),
        ):
            positive_int(name, value)
        self.family, self.meta_batch_size = family, meta_batch_size
        self.k_shot, self.query_size = k_shot, query_size
        self.seed, self.device, self.chunk = seed, device, chunk
        self._cached: tuple[int, TaskBatch] | None = None

    def batch(self, step: int) -> TaskBatch:
        index, offset = divmod(step, self.chunk)
        if self._cached is None or self._cached[0] != index:
            generator = make_generator(stream_seed(self.seed, index), self.device)
            tasks = self.family.sample(
                self.chunk * self.meta_batch_size,
                generator,
                k_shot=self.k_shot,
                query_size=self.query_size,
            )
            self._cached = (index, tasks)
        tasks = self._cached[1]
        lo, hi = offset * self.meta_batch_size, (offset + 1) * self.meta_batch_size
        return tasks.tasks(lo, hi)


class FixedTasks:
    """A fixed set of tasks (validation or meta-test), drawn from its own seed.

    Tasks are drawn in chunks of ``chunk`` tasks, chunk ``i`` from a generator seeded by
    ``(seed, i)``, so the set depends on ``(seed, chunk)`` only. Small sets (regression) are
    kept in memory; large ones (images) are redrawn, identically, each time they are used.

    Raises:
        InvalidArgument: ``num_tasks``, ``k_shot``, ``query_size`` or ``chunk`` (when given) is
            not an integer >= 1.
    """

    def __init__(
        self,
        family: TaskFamily,
        *,
        num_tasks: int,
        k_shot: int,
        query_size: int,
        seed: int,
        device: torch.device,
        chunk: int | None = None,
        keep: bool = True,
    ) -> None:
        for name, value in (
            ("num_tasks", num_tasks),
            ("k_shot", k_shot),
            ("query_size", query_size),
        ):
            positive_int(name, value)
        if chunk is not None:
            positive_int("chunk", chunk)
        self.family, self.num_tasks, self.k_shot, self.query_size = (
            family,
            num_tasks,
            k_shot,
            query_size,
        )
        self.seed, self.device = seed, device
        self.chunk = min(chunk or num_tasks, num_tasks)
        self._kept: list[TaskBatch] | None = [] if keep else None

    def batches(self) -> Iterator[TaskBatch]:
        """The set, ``chunk`` tasks at a time (the last chunk may be smaller)."""
        if self._kept:
            yield from self._kept
            return
        for index, lo in enumerate(range(0, self.num_tasks, self.chunk)):
            size = min(self.chunk, self.num_tasks - lo)
            generator = make_generator(self.seed + (index << 32), self.device)
            batch = self.family.sample(
                size, generator, k_shot=self.k_shot, query_size=self.query_size
            )
            if self._kept is not None:
                self._kept.append(batch)
            yield batch

    def first(self, num: int) -> TaskBatch:
        """The first ``num`` tasks of the set (for plots)."""
        return next(iter(self.batches())).tasks(0, num)
