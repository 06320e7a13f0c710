"""The outer loop: meta-steps, logging, validation, checkpoints, interrupts.

``fit`` takes plain objects: an ``update(step)`` callable that performs one meta-step and returns
its (detached) training loss, the meta-parameters (checked for NaN), and small
``Tracker``/``Checkpointer`` interfaces. It never reads a config. ``gradient_step`` makes the
usual update (outer loss → backward → outer optimiser); RL's TRPO step is another such callable.
The hot path holds no host-device synchronisation: the training loss is summed on the device and
read once every ``log_every`` steps.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from maml_runner.checkpoint import Resumed
from maml_runner.maml.functional import Params
from maml_runner.tasks import TaskStream
from maml_runner.tasks.batch import TaskBatch


class Learner(Protocol):
    model: torch.nn.Module

    def outer_loss(self, params: Params, batch: TaskBatch) -> torch.Tensor: ...


Update = Callable[[int], torch.Tensor]


# A CPU pass's largest activation (tasks × examples per task × the model's largest activation
# per example) is kept within 32 MiB. With freed memory kept in the process
# (``memory.keep_freed_memory``, which every run sets) this costs no speed and cuts peak memory
# (Omniglot 5w1s on 2 cores: 1.61 it/s in passes of 8 tasks vs 1.60 in one pass of 32, at ~1/3
# of the memory); where that setting is unavailable, glibc reuses blocks up to 32 MiB anyway and
# maps larger ones afresh every meta-step, so small passes are also the faster ones there.
CPU_PASS_BYTES = 32 * 2**20


def auto_tasks_per_pass(model: torch.nn.Module, batch: TaskBatch) -> int:
    """``trainer.tasks_per_pass=auto``: the whole meta-batch on a GPU; fewer tasks on a CPU.

    A GPU is bound by kernel launches at MAML's sizes, so one pass over all tasks is fastest
    there. On a CPU, passes are sized to ``CPU_PASS_BYTES`` of activations (see above); the size
    of one example's largest activation is read from a forward pass of two examples.
    """
    if batch.support_x.device.type != "cpu":
        return batch.num_tasks
    largest = 0

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        nonlocal largest
        largest = max(largest, out[0].numel() * out.element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # batch norm's running stats
    try:
        with torch.no_grad():
            model(batch.query_x[0, :2])
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    per_task = largest * (batch.support_x.shape[1] + batch.query_x.shape[1])
    return max(1, min(batch.num_tasks, CPU_PASS_BYTES // max(per_task, 1)))


def meta_backward(
    learner: Learner,
    params: Params,
    batch: TaskBatch,
    tasks_per_pass: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Accumulate ``scale`` × ∇θ of the outer loss into ``.grad``, ``tasks_per_pass`` at a time.

    Each pass backpropagates its tasks' share of the mean (``outer_loss`` × tasks/T): the
    tasks' losses are independent (batch norm normalises each task alone), so the sum of the
    passes' gradients is the meta-gradient of the whole meta-batch, up to float rounding. Fewer
    tasks per pass cost more kernel launches and need less memory. Returns the (detached)
    scaled outer loss. ``None``: one pass.
    """
    total = batch.num_tasks
    size = tasks_per_pass or total
    losses = []
    for lo in range(0, total, size):
        hi = min(total, lo + size)
        loss = learner.outer_loss(params, batch.tasks(lo, hi)) * (scale * (hi - lo) / total)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def gradient_step(
    learner: Learner,
    params: Params,
    optimizer: torch.optim.Optimizer,
    stream: TaskStream,
    tasks_per_pass: int | None = None,
) -> Update:
    """One meta-step as ``update(step)``: outer loss on meta-batch ``step``, backward, optimiser.

    ``tasks_per_pass``: tasks per forward/backward pass (``None``: all), see ``meta_backward``.
    """

    def update(step: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = meta_backward(learner, params, stream.batch(step), tasks_per_pass)
        optimizer.step()
        return loss

    return update


def announced(update: Update, at_iteration: Callable[[int], None]) -> Update:
    """``update`` that first tells the learner its meta-iteration (``at_iteration(step)``), for
    schedules inside the learner (MAML++'s multi-step loss and derivative-order annealing); a
    pure function of the step, so a resumed run follows the same schedule."""

    def step(index: int) -> torch.Tensor:
        at_iteration(index)
        return update(index)

    return step


def scheduled(update: Update, scheduler: torch.optim.lr_scheduler.LRScheduler) -> Update:
    """``update`` followed by one step of the outer learning-rate schedule.

    The step's figures gain the outer learning rate it used (``meta_train/outer_lr``).
    """

    def step(index: int) -> torch.Tensor:
        lr = scheduler.get_last_lr()[0]
        figures = update(index)
        scheduler.step()
        return torch.cat([figures.reshape(-1), figures.new_tensor([lr])])

    return step


class Logger(Protocol):
    def log(
        self, metrics: dict[str, float], step: int, train_time: float | None = None
    ) -> None: ...


class Saver(Protocol):
    def save(self, step: int, best: dict | None, train_time: float) -> None: ...

    def save_best(self, step: int, best: dict, train_time: float) -> None: ...

    def validated(self, step: int, this: dict, maximize: bool, train_time: float) -> None: ...


@dataclass(frozen=True)
class Cadence:
    """When the loop does what, in meta-iterations (0: never, except at the end)."""

    steps: int  # the last meta-iteration
    val_every: int
    checkpoint_every: int
    log_every: int  # training figures are averaged over this many steps
    progress: bool  # a live display on a terminal, a line a minute in a log file


@dataclass(frozen=True)
class Validation:
    """``run()`` → metrics; ``key`` is the one that picks the best step (higher if maximize)."""

    run: Callable[[], dict[str, float]]
    key: str
    maximize: bool


class Diverged(RuntimeError):
    """The meta-training loss or the meta-parameters became NaN or infinite."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


@dataclass
class FitResult:
    step: int
    interrupted: bool
    train_time: float
    it_per_s: float
    best: dict | None = field(default=None)
    last_validation: dict | None = None  # the final validation: key, value, step


@contextmanager
def _catch_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag the loop polls, so it can checkpoint and stop cleanly."""
    received: list[int] = []
    handlers = {}

    def handler(signum: int, frame: object) -> None:
        received.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield received
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)


def _progress(console: Console, label: str) -> Progress:
    return Progress(
        TextColumn("[bold]meta-train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]} it/s"),
        TextColumn(label + " {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=4,
    )


# seconds between two progress lines where no live display can be drawn (stderr not a terminal)
PROGRESS_LINE_S = 60.0


class _Lines:
    """The progress display of a run whose stderr is a file (nohup, a cluster log): at a logged
    step, one line if ``PROGRESS_LINE_S`` have passed since the last, and at the last step."""

    def __init__(self, console: Console, label: str, total: int) -> None:
        self.console, self.label, self.total = console, label, total
        self.last = time.perf_counter()

    def update(self, step: int, speed: float, loss: float, train_time: float) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_LINE_S and step < self.total:
            return
        self.last = now
        eta = (self.total - step) / speed if speed > 0 else math.inf
        self.console.print(  # one line however long: a log file has no width to wrap at
            f"[{time.strftime('%H:%M:%S')}] meta-train {step}/{self.total}: {speed:.3g} it/s, "
            f"{self.label} {loss:.4g}, {_clock(train_time)} trained, ETA {_clock(eta)}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _finite(params: Params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params.values())


def _validate(
    validation: Validation,
    step: int,
    best: dict | None,
    tracker: Logger,
    console: Console,
    train_time: float,
) -> tuple[dict | None, dict]:
    """Validate at ``step`` (after ``train_time`` seconds of training); return the new best (a
    NaN/inf value is never the best) and this validation's ``{key, value, step}``."""
    metrics = validation.run()
    tracker.log(metrics, step, train_time)
    key, value = validation.key, metrics[validation.key]
    this = {"key": key, "value": value, "step": step}
    improved = math.isfinite(value) and (
        best is None or (value > best["value"] if validation.maximize else value < best["value"])
    )
    if improved:
        best = {"key": key, "value": value, "step": step}
        note = " (best)"
    elif best is None:
        note = " (not finite: no best yet)"
    else:
        note = f" (best {best['value']:.4f} at {best['step']})"
    console.log(f"step {step}: {key} {value:.4f}{note}")
    return best, this


def fit(
    update: Update,
    params: Params,
    cadence: Cadence,
    *,
    tracker: Logger,
    checkpointer: Saver,
    resumed: Resumed = Resumed(),
    validation: Validation | None = None,
    metrics: Sequence[str] = ("meta_train/query_loss",),
    stop: Callable[[bool], bool] | None = None,
) -> FitResult:
    """Meta-train from ``resumed.step`` to ``cadence.steps``; checkpoint at the end and on stop.

    ``update(step)`` returns the step's training figures, named by ``metrics`` (a scalar or a
    vector of ``len(metrics)``); their means over ``log_every`` steps are logged and the first is
    shown in the progress display. ``stop(local)``, when given, decides whether to stop after a
    step, told whether this process got SIGINT/SIGTERM (torchrun's ranks must agree; see
    ``distributed.DistributedStep.stop``).

    Raises:
        Diverged: the loss or θ stopped being finite; the last good checkpoint is kept.
    """
    console = Console(stderr=True, log_path=False)
    steps, log_every = cadence.steps, cadence.log_every
    val_every, checkpoint_every = cadence.val_every, cadence.checkpoint_every
    best, start_step, train_time = resumed.best, resumed.step, resumed.train_time
    if best is not None and (validation is None or best["key"] != validation.key):
        best = None  # chosen on another metric (a run from before the metric changed)
    last_validation = None
    device = next(iter(params.values())).device
    step, count = start_step, 0
    loss_sum = torch.zeros(len(metrics), device=device)
    clock, clock_step = time.perf_counter(), start_step
    interrupted = False

    def save() -> None:
        if not (bool(torch.isfinite(loss_sum).all()) and _finite(params)):
            raise Diverged(step)
        checkpointer.save(step, best, elapsed())

    def elapsed() -> float:
        return train_time + time.perf_counter() - started

    started = time.perf_counter()
    label = metrics[0].split("/")[-1]
    live = cadence.progress and console.is_terminal  # a log file gets lines, not a live bar
    bar = _progress(console, label) if live else None
    lines = _Lines(console, label, steps) if cadence.progress and not live else None
    with _catch_signals() as received, bar if bar is not None else nullcontext():
        task = bar.add_task("train", total=steps, completed=step, speed="-", loss="-") if bar else 0
        while step < steps:
            loss_sum += update(step)
            count += 1
            step += 1

            if step % log_every == 0 or step == steps:
                means = (loss_sum / count).tolist()  # the one host sync of the loop
                if not all(math.isfinite(m) for m in means):
                    raise Diverged(step)
                mean = means[0]
                now = time.perf_counter()
                speed = (step - clock_step) / max(now - clock, 1e-9)
                clock, clock_step = now, step
                trained = elapsed()
                row = {**dict(zip(metrics, means)), "meta_train/it_per_s": speed}
                tracker.log(row, step, trained)
                loss_sum.zero_()
                count = 0
                if bar is not None:
                    bar.update(task, completed=step, speed=f"{speed:.3g}", loss=f"{mean:.4g}")
                if lines is not None:
                    lines.update(step, speed, mean, trained)
            if validation is not None and val_every and (step % val_every == 0 or step == steps):
                best, last_validation = _validate(
                    validation, step, best, tracker, console, elapsed()
                )
                if best is not None and best["step"] == step:  # θ now is the best so far
                    checkpointer.save_best(step, best, elapsed())
                checkpointer.validated(step, last_validation, validation.maximize, elapsed())
            if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                save()
            if stop(bool(received)) if stop is not None else received:
                interrupted = True
                break
        if bar is not None:
            bar.update(task, completed=step)
    save()
    session = time.perf_counter() - started
    done = step - start_step
    return FitResult(
        step=step,
        interrupted=interrupted,
        train_time=train_time + session,
        it_per_s=done / session if session > 0 else 0.0,
        best=best,
        last_validation=last_validation,
    )
