"""Benchmark maml-runner's MAML engine against learn2learn and higher on MAML workloads.

What it measures
    Meta-iterations per second, and peak memory, of second-order MAML with Adam(1e-3) as the
    outer optimizer. One meta-iteration is the whole meta-step: inner forwards, inner gradients
    (with their graph), query loss, backward through the adaptation, and the optimizer step.
    Workloads (``--workload``, repeatable or comma-separated; default: all):

    * sinusoid:          the paper's regression setup (Finn et al., 2017, §5.1): an MLP 1-40-40-1
                         with ReLU, 25 tasks of K=10 support and 10 query points, 1 inner SGD
                         step with α=0.01.
    * omniglot-5w1s:     ``Conv4`` (64 filters, stride-2 convs, spatial-mean head) on 28×28×1
                         images, 5-way 1-shot, 15 query images per class, 32 tasks, 1 inner step
                         with α=0.4.
    * omniglot-20w1s:    the same network with 20 outputs, 20-way 1-shot, 15 query per class,
                         16 tasks, 5 inner steps with α=0.1.
    * miniimagenet-5w1s: ``Conv4`` (32 filters, 2×2 max-pooling, flattened head) on 84×84×3
                         images, 5-way 1-shot, 15 query per class, 4 tasks, 5 inner steps with
                         α=0.01.

    Images are uniform noise from a seeded generator and labels are 0..N-1 (speed does not depend
    on pixel values). Batch norm in ``Conv4`` keeps no running statistics, so every library
    normalises each task with its own batch statistics.

    Three implementations start from identical initial weights and see identical task-batch
    tensors (their hashes are compared):

    * ours:        ``maml_runner.maml.MAML.outer_loss`` with the tasks of a pass batched, through
                   ``trainer.meta_backward`` in passes of ``--tasks-per-pass`` tasks (default
                   auto, as maml-run: all tasks on a GPU, passes within 32 MiB of activations
                   on a CPU; the header of each workload says how many), in a process that
                   keeps freed memory (``maml_runner.memory``, as maml-run; ``--malloc all``
                   does the same for the baselines); Adam fused=True, as maml-run builds it;
    * learn2learn: ``l2l.algorithms.MAML``, a loop over tasks with ``clone()`` / ``adapt()``;
    * higher:      ``higher.innerloop_ctx`` with an SGD inner optimizer, a loop over tasks.

    The baselines follow each library's own MAML example and use Adam's defaults.

    Each library runs each workload in a process of its own (spawned), so that its peak memory
    can be told apart: on CPU, that process's peak RSS (Linux VmHWM) above its RSS once imports,
    weights, data and optimizer exist; on CUDA, ``max_memory_allocated`` above the memory
    allocated at that point. (Not ``ru_maxrss``: a spawned process starts with its parent's.)
    The processes of a workload take turns (only one computes at a time) in ``--rounds`` rounds,
    so that a slow drift of the machine affects all alike. The sinusoid runs a fixed number of
    meta-iterations (1000 + 20 warm-up); the image workloads, which take seconds per
    meta-iteration on a CPU, run for a fixed time per library (``--seconds``: 25 s on CPU, 10 s on
    CUDA, after 1 or 3 warm-up meta-iterations) and at least one meta-iteration a round.
    ``--quick`` times 100 sinusoid meta-iterations and a single cold meta-iteration of each image
    workload, in one round, and checks gradients on 1 task: a smoke run, not a measurement.

    Before any timing, the meta-gradient of the mean query loss with respect to θ is computed in
    float64 by each library's timed code path on every selected workload (the sinusoid on its 25
    tasks, the image workloads on 2 tasks), and each baseline's is compared with ours: the
    relative difference is max|g_lib - g_ours| / max|g_ours| for each parameter tensor,
    maximised over tensors. A tensor whose gradient is zero in exact arithmetic (the conv biases
    before batch norm, which the normalisation cancels) holds only rounding noise, so the
    denominator is never less than 1e-6 × the largest |g_ours| of the whole model. If any
    difference exceeds 1e-6 the script exits with status 1 without timing anything.

    Other processes on the CPUs distort CPU timings far more than their share (torch's threads
    wait for each other), so the load that other processes put on the CPUs while a workload is
    timed is measured (/proc/stat minus the workers' own CPU time) and flagged above 0.25 cores.
    ``--device cuda`` (the default where CUDA is available) times on the GPU, synchronising
    around each timed chunk.

How to run
    python scripts/bench.py                          # everything: ~7 min on 2 idle CPU cores
    python scripts/bench.py --quick                  # a ~1 min smoke run of every workload
    python scripts/bench.py --workload sinusoid      # ~75 s
    python scripts/bench.py --workload omniglot-5w1s,miniimagenet-5w1s --seconds 60
    python scripts/bench.py --only ours --device cuda
    python scripts/bench.py --workload omniglot-5w1s --tasks-per-pass 32   # ours in one pass
    python scripts/bench.py --workload sinusoid --iters 200 --threads 1

    The baselines are optional (``pip install -e .[bench]``, see the README for the steps that
    build learn2learn on Python 3.11). A missing baseline is reported in one line and skipped.
    learn2learn imports torchvision at import time but its MAML never uses it; if torchvision is
    absent or cannot load (e.g. a CUDA torchvision wheel beside a CPU-only torch), a stand-in
    module is put in its place so that ``import learn2learn`` succeeds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import multiprocessing
import os
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if importlib.util.find_spec("maml_runner") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_runner.maml import (  # noqa: E402
    MAML,
    TaskBatch,
    TaskLoss,
    classification_loss,
    regression_loss,
)
from maml_runner.memory import keep_freed_memory  # noqa: E402
from maml_runner.models import MLP, Conv4  # noqa: E402
from maml_runner.tasks.sinusoid import Sinusoid  # noqa: E402
from maml_runner.trainer import auto_tasks_per_pass, meta_backward  # noqa: E402

OUTER_LR = 1e-3
GRAD_RTOL = 1e-6
INSTALL_HINT = "pip install -e .[bench]"
LIBRARIES = ("ours", "learn2learn", "higher")


# ------------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    """One benchmark setup: a network, a task batch and MAML's inner-loop settings."""

    name: str
    summary: str
    build_model: Callable[[], nn.Module]
    sample: Callable[[torch.Generator], TaskBatch]  # the meta-batch, on CPU, float32
    task_loss: Callable[[], TaskLoss]  # ours
    baseline_loss: Callable[[Tensor, Tensor], Tensor]  # learn2learn and higher, one task
    inner_lr: float
    inner_steps: int
    check_tasks: int  # tasks in the float64 gradient check
    iters: int | None  # a fixed number of timed meta-iterations, or None: time-based
    warmup: int  # meta-iterations before timing (on CPU)

    def build(self, seed: int) -> tuple[nn.Module, TaskBatch]:
        """The initial weights and the task batch, identical in every process for a seed."""
        torch.manual_seed(seed)
        model = self.build_model()
        batch = self.sample(torch.Generator().manual_seed(seed))
        return model, batch

    def maml(self, model: nn.Module, *, first_order: bool = False) -> MAML:
        return MAML(
            model,
            self.task_loss(),
            inner_lr=self.inner_lr,
            inner_steps=self.inner_steps,
            first_order=first_order,
        )


def _sinusoid_batch(meta_batch: int, k_shot: int, query: int) -> Callable[..., TaskBatch]:
    def sample(generator: torch.Generator) -> TaskBatch:
        batch = Sinusoid().sample(meta_batch, generator, k_shot=k_shot, query_size=query)
        # drop `info`: every library sees the same 4 tensors
        return TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    return sample


def _image_batch(
    meta_batch: int, ways: int, shots: int, query: int, channels: int, size: int
) -> Callable[..., TaskBatch]:
    """Noise images ``[T, N*K, C, H, W]`` with labels ``[T, N*K]`` in 0..N-1, class by class."""

    def split(generator: torch.Generator, per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(meta_batch, ways * per_class, channels, size, size, generator=generator)
        y = torch.arange(ways).repeat_interleave(per_class).repeat(meta_batch, 1)
        return x, y

    def sample(generator: torch.Generator) -> TaskBatch:
        return TaskBatch(*split(generator, shots), *split(generator, query))

    return sample


def _image_workload(
    name: str,
    *,
    channels: int,
    size: int,
    filters: int,
    downsample: str,
    head: str,
    ways: int,
    meta_batch: int,
    steps: int,
    lr: float,
) -> Workload:
    """N-way 1-shot classification with 15 query images per class, on ``Conv4``."""
    pooling = "stride-2" if downsample == "stride" else "max-pool"
    return Workload(
        name=name,
        summary=(
            f"Conv4 {filters} filters {pooling} {head} head, {size}x{size}x{channels}; "
            f"{ways}-way 1-shot, 15 query/class, {meta_batch} tasks, {steps} inner "
            f"step{'s' if steps > 1 else ''} (lr {lr:g}), second order, Adam {OUTER_LR:g}"
        ),
        build_model=lambda: Conv4(
            in_channels=channels,
            image_size=size,
            num_classes=ways,
            filters=filters,
            blocks=4,
            downsample=downsample,
            head=head,
        ),
        sample=_image_batch(meta_batch, ways, 1, 15, channels, size),
        task_loss=classification_loss,
        baseline_loss=F.cross_entropy,
        inner_lr=lr,
        inner_steps=steps,
        check_tasks=2,
        iters=None,
        warmup=1,
    )


OMNIGLOT = dict(channels=1, size=28, filters=64, downsample="stride", head="mean")
MINIIMAGENET = dict(channels=3, size=84, filters=32, downsample="max_pool", head="flatten")
WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            name="sinusoid",
            summary=(
                f"MLP 1-40-40-1 ReLU, 25 tasks, K=10+10, 1 inner step (lr 0.01), second order, "
                f"Adam {OUTER_LR:g}"
            ),
            build_model=lambda: MLP(1, 1, hidden=(40, 40), activation="relu"),
            sample=_sinusoid_batch(25, 10, 10),
            task_loss=regression_loss,
            baseline_loss=F.mse_loss,
            inner_lr=0.01,
            inner_steps=1,
            check_tasks=25,
            iters=1000,
            warmup=20,
        ),
        _image_workload("omniglot-5w1s", **OMNIGLOT, ways=5, meta_batch=32, steps=1, lr=0.4),
        _image_workload("omniglot-20w1s", **OMNIGLOT, ways=20, meta_batch=16, steps=5, lr=0.1),
        _image_workload(
            "miniimagenet-5w1s", **MINIIMAGENET, ways=5, meta_batch=4, steps=5, lr=0.01
        ),
    )
}


def to_device(batch: TaskBatch, device: torch.device, dtype: torch.dtype) -> TaskBatch:
    """Move ``batch`` to ``device``, floating tensors in ``dtype`` (labels stay integers)."""

    def move(t: Tensor) -> Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return TaskBatch(
        *(move(t) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    )


def first_tasks(batch: TaskBatch, n: int) -> TaskBatch:
    return TaskBatch(batch.support_x[:n], batch.support_y[:n], batch.query_x[:n], batch.query_y[:n])


def fingerprint(model: nn.Module, batch: TaskBatch) -> str:
    """A hash of the weights and the data, to show that every library got the same."""
    digest = hashlib.sha256()
    tensors = [*model.state_dict().values(), batch.support_x, batch.support_y]
    for t in [*tensors, batch.query_x, batch.query_y]:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- optional baselines


class _StandInModule(types.ModuleType):
    """A module whose every attribute is a harmless stand-in: a sub-module or an empty class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value: Any
        if name[:1].islower():  # `from torchvision import transforms` wants a sub-module
            value = importlib.import_module(f"{self.__name__}.{name}")
        else:  # `class CIFARFS(ImageFolder)` wants a class
            value = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve ``torchvision`` and all its sub-modules as ``_StandInModule``s."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so that `import torchvision.x.y` works


def _ensure_torchvision_importable() -> str | None:
    """Make ``import torchvision`` succeed; return a note if a stand-in had to be used."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # absent, or present but its C++ ops do not match this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandInFinder())
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return f"torchvision unusable ({reason}); using a stand-in (learn2learn's MAML needs none)"
    return None


def import_learn2learn() -> tuple[Any | None, str | None]:
    """Return ``(learn2learn or None, a one-line note or None)``."""
    if importlib.util.find_spec("learn2learn") is None:
        return None, f"learn2learn not installed: skipping it ({INSTALL_HINT})"
    note = _ensure_torchvision_importable()
    try:
        # gym, which learn2learn imports, prints a deprecation notice to stderr on import
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import learn2learn
    except Exception as exc:
        return None, f"learn2learn failed to import ({type(exc).__name__}: {exc}); skipping it"
    return learn2learn, note


def import_higher() -> tuple[Any | None, str | None]:
    try:
        import higher
    except ImportError:
        return None, f"higher not installed: skipping it ({INSTALL_HINT})"
    return higher, None


def import_library(name: str) -> tuple[Any | None, str | None]:
    if name == "learn2learn":
        return import_learn2learn()
    if name == "higher":
        return import_higher()
    return None, None


# ------------------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """One implementation: ``meta_grad`` writes d(mean query loss)/dθ into ``.grad`` of θ."""

    name: str
    model: nn.Module
    meta_grad: Callable[[TaskBatch], Tensor]
    optimizer: torch.optim.Optimizer
    params: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self.model.parameters())

    def step(self, batch: TaskBatch) -> Tensor:
        """One full meta-iteration; returns the (detached) mean query loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_grad(batch)
        self.optimizer.step()
        return loss

    def gradient(self, batch: TaskBatch) -> list[Tensor]:
        for p in self.params:
            p.grad = None
        self.meta_grad(batch)
        return [p.grad.detach().clone() for p in self.params]  # type: ignore[union-attr]


def make_ours(
    workload: Workload, lib: Any, model: nn.Module, tasks_per_pass: int | None = None
) -> Runner:
    """maml-run's meta-step: ``meta_backward`` in passes of ``tasks_per_pass`` (None: one)."""
    maml = workload.maml(model)
    params = dict(model.named_parameters())

    def meta_grad(batch: TaskBatch) -> Tensor:
        return meta_backward(maml, params, batch, tasks_per_pass)

    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR, fused=True)
    return Runner("ours", model, meta_grad, optimizer)


def make_learn2learn(workload: Workload, l2l: Any, model: nn.Module) -> Runner:
    """learn2learn's own examples: clone, adapt on support, sum query losses, backward."""
    maml = l2l.algorithms.MAML(model, lr=workload.inner_lr, first_order=False)
    loss_fn, steps = workload.baseline_loss, workload.inner_steps

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype, device=batch.query_x.device)
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(batch.support_x[t]), batch.support_y[t]))
            total = total + loss_fn(learner(batch.query_x[t]), batch.query_y[t])
        loss = total / batch.num_tasks
        loss.backward()
        return loss.detach()

    return Runner("learn2learn", model, meta_grad, torch.optim.Adam(maml.parameters(), OUTER_LR))


def make_higher(workload: Workload, higher: Any, model: nn.Module) -> Runner:
    """higher's MAML example: one innerloop_ctx per task, backward of each query loss inside."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=workload.inner_lr)
    loss_fn, steps = workload.baseline_loss, workload.inner_steps

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype, device=batch.query_x.device)
        for t in range(batch.num_tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, diff):
                for _ in range(steps):
                    diff.step(loss_fn(fm(batch.support_x[t]), batch.support_y[t]))
                query_loss = loss_fn(fm(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks
                query_loss.backward()
                total = total + query_loss.detach()
        return total

    return Runner("higher", model, meta_grad, torch.optim.Adam(model.parameters(), OUTER_LR))


BASELINES: dict[str, Callable[[Workload, Any, nn.Module], Runner]] = {
    "learn2learn": make_learn2learn,
    "higher": make_higher,
}


def make_runner(
    name: str, workload: Workload, lib: Any, model: nn.Module, tasks_per_pass: int
) -> Runner:
    """Ours in passes of ``tasks_per_pass`` tasks (resolved once per workload), or a baseline."""
    if name == "ours":
        return make_ours(workload, lib, model, tasks_per_pass)
    return BASELINES[name](workload, lib, model)


def resolve_tasks_per_pass(workload: Workload, args: argparse.Namespace) -> int:
    """``--tasks-per-pass``, or what ``trainer.tasks_per_pass=auto`` picks for the workload."""
    if args.tasks_per_pass is not None:
        return args.tasks_per_pass
    model, batch = workload.build(args.seed)
    return auto_tasks_per_pass(model, to_device(batch, torch.device(args.device), torch.float32))


# ------------------------------------------------------------------------------------- checks


def relative_difference(grads: list[Tensor], reference: list[Tensor]) -> float:
    """max over tensors of max|g - g_ref| / max|g_ref| (at least the model-wide max|g_ref|·1e-6).

    A tensor whose exact gradient is zero (a conv bias before batch norm) holds rounding noise
    only: it is measured against a millionth of the largest gradient in the model instead.
    """
    floor = max(ref.abs().max().item() for ref in reference) * 1e-6
    worst = 0.0
    for g, ref in zip(grads, reference, strict=True):
        scale = max(ref.abs().max().item(), floor, torch.finfo(ref.dtype).tiny)
        worst = max(worst, (g - ref).abs().max().item() / scale)
    return worst


def check_gradients(
    workload: Workload,
    libs: dict[str, Any],
    device: torch.device,
    seed: int,
    tasks: int,
    tasks_per_pass: int,
) -> dict[str, float]:
    """Relative difference of each baseline's float64 meta-gradient from ours, on ``tasks``."""
    init, batch = workload.build(seed)
    batch = to_device(first_tasks(batch, tasks), device, torch.float64)
    grads = {
        name: make_runner(
            name, workload, lib, copy.deepcopy(init).to(device, torch.float64), tasks_per_pass
        ).gradient(batch)
        for name, lib in libs.items()
    }
    return {
        name: relative_difference(g, grads["ours"]) for name, g in grads.items() if name != "ours"
    }


# ------------------------------------------------------------------------------------- workers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


class PeakMemory:
    """Peak memory of this process above its use at construction, in bytes.

    On CPU this is Linux's VmHWM (peak RSS of this process image), reset to the current RSS at
    construction through /proc/self/clear_refs where that is allowed. Not ``ru_maxrss``: a
    spawned process inherits its parent's peak RSS in it, through fork and exec.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _proc_status_bytes("VmRSS")
        except OSError:  # not Linux, or not allowed: the peak so far is the baseline
            self.base = self._peak()

    def _peak(self) -> int:
        try:
            return _proc_status_bytes("VmHWM")
        except OSError:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes, Linux: KiB

    def growth(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._peak() - self.base


@dataclass(frozen=True)
class WorkerSpec:
    workload: str
    library: str
    seed: int
    device: str
    threads: int
    tasks_per_pass: int  # ours, resolved by the parent
    malloc: str  # "ours": only ours keeps freed memory, as maml-run does; "all": every library


def query_loss_after_adaptation(workload: Workload, model: nn.Module, batch: TaskBatch) -> float:
    """Mean query loss of the trained weights after the inner steps, computed by our engine."""
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    return workload.maml(model, first_order=True).outer_loss(params, batch).item()


def _serve(conn: Connection, spec: WorkerSpec) -> None:
    torch.set_num_threads(spec.threads)
    if spec.library == "ours" or spec.malloc == "all":
        keep_freed_memory()  # as maml-run does at start
    device = torch.device(spec.device)
    lib, note = import_library(spec.library)
    if spec.library != "ours" and lib is None:
        raise RuntimeError(note)
    workload = WORKLOADS[spec.workload]
    init, batch = workload.build(spec.seed)
    hashed = fingerprint(init, batch)
    batch = to_device(batch, device, torch.float32)
    runner = make_runner(spec.library, workload, lib, init.to(device), spec.tasks_per_pass)
    memory = PeakMemory(device)
    conn.send(("ready", hashed))
    while True:
        command, *args = conn.recv()
        if command == "run":  # at least `min_iters` meta-iterations and `seconds` seconds
            seconds, min_iters = args
            _synchronize(device)
            cpu, start, done = time.process_time(), time.perf_counter(), 0
            while done < min_iters or time.perf_counter() - start < seconds:
                runner.step(batch)
                done += 1
            _synchronize(device)
            elapsed = time.perf_counter() - start
            conn.send(("ran", done, elapsed, time.process_time() - cpu))
        elif command == "finish":
            peak = memory.growth()
            conn.send(("result", peak, query_loss_after_adaptation(workload, runner.model, batch)))
            return
        else:
            raise ValueError(f"unknown command {command!r}")


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a spawned worker: one library on one workload, driven through ``conn``."""
    try:
        _serve(conn, spec)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class WorkerError(RuntimeError):
    pass


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, context: Any, spec: WorkerSpec) -> None:
        self.name = spec.library
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    def receive(self) -> tuple[Any, ...]:
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise WorkerError(
                f"the {self.name} worker died (exit code {self.process.exitcode}; out of memory?)"
            ) from None
        if reply[0] == "error":
            raise WorkerError(f"the {self.name} worker failed:\n{reply[1]}")
        return reply

    def call(self, *message: Any) -> tuple[Any, ...]:
        self.conn.send(message)
        return self.receive()

    def close(self) -> None:
        self.conn.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


# ------------------------------------------------------------------------------------- timing


class CpuLoad:
    """Cores kept busy by other processes between ``__init__`` and ``others()`` (Linux)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ours = 0.0  # CPU seconds that our own processes spent meanwhile
        try:
            self.jiffies: tuple[int, int] | None = _cpu_times()
        except (OSError, ValueError, IndexError):  # not Linux
            self.jiffies = None

    def others(self) -> float | None:
        if self.jiffies is None:
            return None
        idle, total = _cpu_times()
        busy = (total - self.jiffies[1] - (idle - self.jiffies[0])) / os.sysconf("SC_CLK_TCK")
        return max(busy - self.ours, 0.0) / (time.perf_counter() - self.start)


@dataclass
class Result:
    iters: int = 0
    seconds: float = 0.0
    peak_bytes: int = 0
    final_loss: float = float("nan")

    @property
    def rate(self) -> float:
        return self.iters / self.seconds


@dataclass(frozen=True)
class Budget:
    """Per library: ``iters`` fixed meta-iterations, or else ``seconds`` of them; + warm-up."""

    iters: int | None
    seconds: float
    warmup: int
    rounds: int

    def describe(self) -> str:
        what = f"{self.iters} meta-iterations" if self.iters else f"~{self.seconds:g} s"
        rounds = f"{self.rounds} round{'s' if self.rounds > 1 else ''}"
        return f"{what} per library (+{self.warmup} warm-up, {rounds})"


def benchmark(
    workload: Workload,
    libraries: list[str],
    budget: Budget,
    args: argparse.Namespace,
    tasks_per_pass: int,
) -> tuple[dict[str, Result], float | None]:
    """Time each library in its own process; the libraries take turns in ``rounds`` chunks.

    Returns the results and the number of cores that other processes kept busy meanwhile.
    """
    context = multiprocessing.get_context("spawn")
    workers = [
        Worker(
            context,
            WorkerSpec(
                workload.name,
                name,
                args.seed,
                args.device,
                args.threads,
                tasks_per_pass,
                args.malloc,
            ),
        )
        for name in libraries
    ]
    try:
        hashes = {w.name: w.receive()[1] for w in workers}  # they start up side by side
        if len(set(hashes.values())) != 1:
            raise WorkerError(f"the libraries got different weights or data: {hashes}")
        results = {w.name: Result() for w in workers}
        if budget.warmup:
            for w in workers:
                w.call("run", 0.0, budget.warmup)
        load = CpuLoad()
        for i in range(budget.rounds):
            for w in workers:
                if budget.iters is not None:
                    chunk = budget.iters // budget.rounds + (i < budget.iters % budget.rounds)
                    _, done, elapsed, cpu = w.call("run", 0.0, chunk)
                else:
                    _, done, elapsed, cpu = w.call("run", budget.seconds / budget.rounds, 1)
                results[w.name].iters += done
                results[w.name].seconds += elapsed
                load.ours += cpu
        others = load.others()
        for w in workers:
            _, results[w.name].peak_bytes, results[w.name].final_loss = w.call("finish")
        return results, others
    finally:
        for w in workers:
            w.close()


def print_table(results: dict[str, Result], fixed_iters: bool) -> None:
    base = results.get("learn2learn")
    same_iters = fixed_iters and len({r.iters for r in results.values()}) == 1
    loss_head = f" {'final loss':>11}" if same_iters else ""
    print(f"{'library':<12} {'it/s':>9} {'vs l2l':>8} {'iters':>6} {'peak MiB':>9}{loss_head}")
    for name, r in results.items():
        ratio = f"{r.rate / base.rate:7.2f}x" if base else f"{'-':>8}"
        loss = f" {r.final_loss:>11.4f}" if same_iters else ""
        print(
            f"{name:<12} {_rate(r.rate):>9} {ratio} {r.iters:>6} {r.peak_bytes / 2**20:>9.1f}{loss}"
        )
    if same_iters:
        print("(final loss: query loss after adaptation from each library's trained weights)")


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}" if rate >= 1 else f"{rate:.3f}"


def print_summary(all_results: dict[str, dict[str, Result]], disturbed: list[str]) -> None:
    libraries = [name for name in LIBRARIES if any(name in r for r in all_results.values())]
    head = "".join(f" {name + ' it/s':>16}" for name in libraries)
    print(f"\n{'summary':<18}{head} {'ours/l2l':>9}  peak MiB ({', '.join(libraries)})")
    for workload, results in all_results.items():
        rates = "".join(
            f" {_rate(results[n].rate) if n in results else '-':>16}" for n in libraries
        )
        base = results.get("learn2learn")
        ratio = f"{results['ours'].rate / base.rate:8.2f}x" if base else f"{'-':>9}"
        peaks = ", ".join(f"{results[n].peak_bytes / 2**20:.0f}" for n in results)
        mark = "*" if workload in disturbed else ""
        print(f"{workload + mark:<18}{rates} {ratio}  {peaks}")
    if disturbed:
        print("(*: timed while other processes used the CPUs)")


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


BUSY_CORES = 0.25  # other processes' load above which timings are flagged


def warn_if_busy(interval: float = 0.5) -> None:
    """Timings on a shared machine are low and noisy: say so when others are using the CPUs."""
    load = CpuLoad()
    time.sleep(interval)
    busy = load.others()
    if busy is not None and busy > BUSY_CORES:
        print(
            f"WARNING: other processes keep {busy:.1f} of {os.cpu_count()} CPU cores busy; "
            "the timings below will be low and noisy"
        )


# --------------------------------------------------------------------------------------- main


def _workload_names(values: list[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    if not values:
        return list(WORKLOADS)
    names: list[str] = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name == "all":
                names.extend(WORKLOADS)
            elif name not in WORKLOADS:
                parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, all")
            else:
                names.append(name)
    return list(dict.fromkeys(names))  # in order, once each


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"repeatable or comma-separated: {', '.join(WORKLOADS)} or all (default: all)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    parser.add_argument(
        "--iters",
        type=int,
        help="time this many meta-iterations per library on every workload (default: 1000 on "
        "the sinusoid; the image workloads are timed for --seconds)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="time each library for this long on every workload (default: 25 on CPU, 10 on "
        "CUDA, for the image workloads)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed meta-iterations first (default: 20 on the sinusoid; 1 on the image "
        "workloads, 3 on CUDA)",
    )
    parser.add_argument(
        "--rounds", type=int, help="turns the libraries take (default 4, with --quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ours"], help="time only maml-runner")
    parser.add_argument(
        "--malloc",
        choices=["ours", "all"],
        default="ours",
        help="whose process keeps freed memory (maml_runner.memory.keep_freed_memory): ours, as "
        "maml-run does (default), or every library's, to compare with that tuning alike",
    )
    parser.add_argument(
        "--tasks-per-pass",
        default="auto",
        help="ours: tasks per forward/backward pass, as trainer.tasks_per_pass (default: auto)",
    )
    args = parser.parse_args(argv)
    args.workloads = _workload_names(args.workload, parser)
    if args.tasks_per_pass == "auto":
        args.tasks_per_pass = None
    elif not args.tasks_per_pass.isdigit() or int(args.tasks_per_pass) < 1:
        parser.error(f"--tasks-per-pass {args.tasks_per_pass}: give a number >= 1, or auto")
    else:
        args.tasks_per_pass = int(args.tasks_per_pass)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.iters is not None and args.seconds is not None:
        parser.error("--iters and --seconds exclude each other")
    if (
        (args.iters is not None and args.iters < 1)
        or (args.seconds is not None and args.seconds <= 0)
        or (args.warmup is not None and args.warmup < 0)
        or (args.rounds is not None and args.rounds < 1)
        or args.threads < 1
    ):
        parser.error("--iters, --rounds and --threads must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def budget_for(workload: Workload, args: argparse.Namespace) -> Budget:
    """The workload's defaults, scaled down by ``--quick``, overridden by explicit options."""
    cuda = args.device == "cuda"
    if workload.iters is not None:  # a fixed number of meta-iterations
        iters: int | None = workload.iters // 10 if args.quick else workload.iters
        warmup = workload.warmup // 4 if args.quick else workload.warmup
    else:  # a fixed time
        iters = None
        warmup = 0 if args.quick else 3 if cuda else workload.warmup
    if args.iters is not None:
        iters = args.iters
    elif args.seconds is not None:
        iters = None
    seconds = args.seconds or (1e-3 if args.quick else 10.0 if cuda else 25.0)
    rounds = args.rounds or (1 if args.quick else 4)
    warmup = warmup if args.warmup is None else args.warmup
    return Budget(iters, seconds, warmup, min(rounds, iters) if iters else rounds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    libs: dict[str, Any] = {"ours": None}
    if args.only == "ours":
        print(f"--only ours: skipping learn2learn and higher (for them: {INSTALL_HINT})")
    else:
        for name in ("learn2learn", "higher"):
            lib, note = import_library(name)
            if note:
                print(note)
            if lib is not None:
                libs[name] = lib

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"second-order MAML, Adam {OUTER_LR:g} outer; torch {torch.__version__} on {where}, "
        f"{torch.get_num_threads()} threads"
    )
    versions = [f"{name} {_version(name)}" for name in libs if name != "ours"]
    if versions:
        print("baselines: " + ", ".join(versions))

    warn_if_busy()
    if args.quick:
        print("--quick: a smoke run; its timings are rough (1 cold meta-iteration of image work)")

    if len(libs) > 1:
        print("\nfloat64 meta-gradient, max relative difference vs ours:")
        ok = True  # the baselines' meta-gradients agree with ours
        for name in args.workloads:
            workload = WORKLOADS[name]
            tasks = 1 if args.quick else workload.check_tasks
            per_pass = resolve_tasks_per_pass(workload, args)
            diffs = check_gradients(workload, libs, device, args.seed, tasks, per_pass)
            cells = []
            for lib_name, diff in diffs.items():
                verdict = "ok" if diff <= GRAD_RTOL else f"MISMATCH (> {GRAD_RTOL:g})"
                cells.append(f"{lib_name} {diff:.2e} {verdict}")
                ok = ok and diff <= GRAD_RTOL
            label = f"{name} ({tasks} task{'s' if tasks > 1 else ''})"
            print(f"  {label:<28} " + "   ".join(cells))
        if not ok:
            print("ERROR: meta-gradients disagree with ours; not timing", file=sys.stderr)
            return 1

    all_results: dict[str, dict[str, Result]] = {}
    disturbed: list[str] = []  # workloads timed while other processes used the CPUs
    for name in args.workloads:
        workload = WORKLOADS[name]
        budget = budget_for(workload, args)
        print(f"\n== {name}: {workload.summary}")
        per_pass = resolve_tasks_per_pass(workload, args)
        how = "--tasks-per-pass" if args.tasks_per_pass else "auto"
        print(f"ours: passes of {per_pass} tasks ({how})")
        print(f"timing {budget.describe()}...")
        try:
            results, others = benchmark(workload, list(libs), budget, args, per_pass)
        except WorkerError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 2
        print_table(results, budget.iters is not None)
        if others is not None and others > BUSY_CORES:
            disturbed.append(name)
            print(
                f"WARNING: other processes kept {others:.1f} of {os.cpu_count()} CPU cores busy "
                "while timing: these numbers are low and unreliable"
            )
        all_results[name] = results

    print_summary(all_results, disturbed)
    memory = "peak RSS above RSS" if device.type == "cpu" else "peak above allocated memory"
    print(f"(peak MiB: {memory} in each library's own process, from when weights, data and")
    print(" optimizer had been built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
