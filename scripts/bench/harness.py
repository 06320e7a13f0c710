"""How the bench times: gradient agreement, worker processes, rounds, peak memory, CPU load.

Each library runs each workload in a process of its own (spawned), so that its peak memory can be
told apart, and the processes of a workload take turns in rounds, so that a slow drift of the
machine affects all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.baselines import BASELINES, import_library
from bench.workloads import (
    WORKLOADS,
    Runner,
    Workload,
    fingerprint,
    first_tasks,
    make_general_path,
    make_ours,
    to_device,
)
from maml_runner.maml import TaskBatch
from maml_runner.memory import keep_freed_memory
from maml_runner.trainer import auto_tasks_per_pass

GRAD_RTOL = 1e-6


def make_runner(
    name: str,
    workload: Workload,
    lib: Any,
    model: nn.Module,
    tasks_per_pass: int,
    algorithm: str = "maml",
) -> Runner:
    """Ours in passes of ``tasks_per_pass`` tasks (resolved once per workload), ours on the
    general (torch.func) path, or a baseline's counterpart of ``algorithm``."""
    if name == "ours":
        return make_ours(workload, lib, model, tasks_per_pass, algorithm)
    if name == "general":
        return make_general_path(workload, lib, model, tasks_per_pass, algorithm)
    return BASELINES[algorithm][name](workload, lib, model)


OURS = ("ours", "general")  # maml-runner's two engines


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
    algorithm: str = "maml",
) -> dict[str, float]:
    """Relative difference of each baseline's float64 meta-gradient from ours, on ``tasks``:
    of all meta-parameters, θ and the algorithm's own (Meta-SGD's α, MAML++'s rates)."""
    init, batch = workload.build(seed)
    batch = to_device(first_tasks(batch, tasks), device, torch.float64)
    grads = {
        name: make_runner(
            name,
            workload,
            lib,
            copy.deepcopy(init).to(device, torch.float64),
            tasks_per_pass,
            algorithm,
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
    algorithm: str = "maml"


def query_loss_after_adaptation(
    workload: Workload, algorithm: str, runner: Runner, batch: TaskBatch
) -> float:
    """Mean query loss of the trained meta-parameters (θ and the algorithm's own) after the
    inner steps, computed by our engine (MAML++: the last step's loss alone)."""
    model = runner.model
    learner = workload.learner(model, algorithm, first_order=True, msl=False)
    learner.learned.load_state_dict({n: t.detach() for n, t in runner.learned.items()})
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    return learner.outer_loss(params, batch).item()


def _serve(conn: Connection, spec: WorkerSpec) -> None:
    torch.set_num_threads(spec.threads)
    if spec.library in OURS or spec.malloc == "all":
        keep_freed_memory()  # as maml-run does at start
    device = torch.device(spec.device)
    lib, note = import_library(spec.library)
    if spec.library not in OURS and lib is None:
        raise RuntimeError(note)
    workload = WORKLOADS[spec.workload]
    init, batch = workload.build(spec.seed)
    hashed = fingerprint(init, batch)
    batch = to_device(batch, device, torch.float32)
    runner = make_runner(
        spec.library, workload, lib, init.to(device), spec.tasks_per_pass, spec.algorithm
    )
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
            final = query_loss_after_adaptation(workload, spec.algorithm, runner, batch)
            conn.send(("result", peak, final))
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
                args.algorithm,
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


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


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
