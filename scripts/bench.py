"""Benchmark maml-runner's MAML engine against learn2learn and higher on the sinusoid workload.

What it measures
    Meta-iterations per second of second-order MAML on the paper's sinusoid setup (Finn et al.,
    2017, §5.1): an MLP 1-40-40-1 with ReLU, a meta-batch of 25 tasks with K=10 support and 10
    query points each, one inner SGD step with α=0.01, and Adam(1e-3) as the outer optimizer.
    One meta-iteration is the whole meta-step: inner forward, inner gradient (with its graph),
    query loss, backward through the adaptation, and the optimizer step.

    Three implementations run in the same process, from identical initial weights, on the same
    task-batch tensors:

    * ours:        ``maml_runner.maml.MAML.outer_loss``, all tasks batched (Adam foreach=True);
    * learn2learn: ``l2l.algorithms.MAML``, a loop over tasks with ``clone()`` / ``adapt()``;
    * higher:      ``higher.innerloop_ctx`` with an SGD inner optimizer, a loop over tasks.

    The baselines follow each library's own MAML example and use Adam's defaults. The libraries
    take turns in ``--rounds`` rounds so that a slow drift of the machine affects all alike.

    Before timing, the meta-gradient of the mean query loss with respect to θ is computed in
    float64 by each library's timed code path, and each baseline's is compared with ours: the
    relative difference is max|g_lib - g_ours| / max|g_ours| for each parameter tensor, maximised
    over tensors. If it exceeds 1e-6 the script exits with status 1 without timing anything.

How to run
    python scripts/bench.py                    # all three: ~75 s on 2 idle CPU cores
    python scripts/bench.py --only ours        # just maml-runner
    python scripts/bench.py --iters 200 --threads 1

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
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import os
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if importlib.util.find_spec("maml_runner") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maml_runner.maml import MAML, TaskBatch, regression_loss  # noqa: E402
from maml_runner.models import MLP  # noqa: E402
from maml_runner.tasks.sinusoid import Sinusoid  # noqa: E402

META_BATCH = 25
K_SHOT = 10
QUERY = 10
INNER_LR = 0.01
OUTER_LR = 1e-3
GRAD_RTOL = 1e-6
INSTALL_HINT = "pip install -e .[bench]"


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


def make_ours(model: nn.Module) -> Runner:
    maml = MAML(model, regression_loss(), inner_lr=INNER_LR, inner_steps=1, first_order=False)
    params = dict(model.named_parameters())

    def meta_grad(batch: TaskBatch) -> Tensor:
        loss = maml.outer_loss(params, batch)
        loss.backward()
        return loss.detach()

    optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR, foreach=True)
    return Runner("ours", model, meta_grad, optimizer)


def make_learn2learn(l2l: Any, model: nn.Module) -> Runner:
    """learn2learn's own sine example: clone, adapt on support, sum query errors, backward."""
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=False)

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype)
        for t in range(batch.num_tasks):
            learner = maml.clone()
            learner.adapt(F.mse_loss(learner(batch.support_x[t]), batch.support_y[t]))
            total = total + F.mse_loss(learner(batch.query_x[t]), batch.query_y[t])
        loss = total / batch.num_tasks
        loss.backward()
        return loss.detach()

    return Runner("learn2learn", model, meta_grad, torch.optim.Adam(maml.parameters(), OUTER_LR))


def make_higher(higher: Any, model: nn.Module) -> Runner:
    """higher's MAML example: one innerloop_ctx per task, backward of each query loss inside."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype)
        for t in range(batch.num_tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, diff):
                diff.step(F.mse_loss(fm(batch.support_x[t]), batch.support_y[t]))
                query_loss = F.mse_loss(fm(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks
                query_loss.backward()
                total = total + query_loss.detach()
        return total

    return Runner("higher", model, meta_grad, torch.optim.Adam(model.parameters(), OUTER_LR))


def build_runners(
    init: nn.Module, l2l: Any | None, higher: Any | None, dtype: torch.dtype
) -> list[Runner]:
    """A runner per available library, each on its own copy of ``init``'s weights."""

    def fresh() -> nn.Module:
        return copy.deepcopy(init).to(dtype)

    runners = [make_ours(fresh())]
    if l2l is not None:
        runners.append(make_learn2learn(l2l, fresh()))
    if higher is not None:
        runners.append(make_higher(higher, fresh()))
    return runners


# ------------------------------------------------------------------------------------- checks


def to_dtype(batch: TaskBatch, dtype: torch.dtype) -> TaskBatch:
    return TaskBatch(
        batch.support_x.to(dtype),
        batch.support_y.to(dtype),
        batch.query_x.to(dtype),
        batch.query_y.to(dtype),
    )


def relative_difference(grads: list[Tensor], reference: list[Tensor]) -> float:
    """max over tensors of max|g - g_ref| / max|g_ref|."""
    worst = 0.0
    for g, ref in zip(grads, reference, strict=True):
        scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
        worst = max(worst, ((g - ref).abs().max() / scale).item())
    return worst


def check_gradients(init: nn.Module, batch: TaskBatch, l2l: Any, higher: Any) -> dict[str, float]:
    """Relative difference of each baseline's float64 meta-gradient from ours."""
    batch64 = to_dtype(batch, torch.float64)
    runners = build_runners(init, l2l, higher, torch.float64)
    reference = runners[0].gradient(batch64)
    return {r.name: relative_difference(r.gradient(batch64), reference) for r in runners[1:]}


# ------------------------------------------------------------------------------------- timing


def benchmark(
    runners: list[Runner], batch: TaskBatch, *, iters: int, warmup: int, rounds: int
) -> dict[str, float]:
    """Meta-iterations per second of each runner; the runners take turns in ``rounds`` chunks."""
    for runner in runners:
        for _ in range(warmup):
            runner.step(batch)
    elapsed = dict.fromkeys((r.name for r in runners), 0.0)
    done = dict.fromkeys((r.name for r in runners), 0)
    for i in range(rounds):
        chunk = iters // rounds + (1 if i < iters % rounds else 0)
        for runner in runners:
            start = time.perf_counter()
            for _ in range(chunk):
                runner.step(batch)
            elapsed[runner.name] += time.perf_counter() - start
            done[runner.name] += chunk
    return {name: done[name] / elapsed[name] for name in elapsed}


def print_table(rates: dict[str, float], final_loss: dict[str, float]) -> None:
    base = rates.get("learn2learn")
    print(f"\n{'library':<12} {'it/s':>10} {'vs l2l':>8} {'final loss':>11}")
    for name, rate in rates.items():
        ratio = f"{rate / base:7.2f}x" if base else f"{'-':>8}"
        print(f"{name:<12} {rate:>10.1f} {ratio} {final_loss[name]:>11.4f}")
    print("(final loss: query loss after one inner step from each library's trained weights)")
    if base:
        print(f"\nours / learn2learn: {rates['ours'] / base:.2f}x")


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def warn_if_busy(interval: float = 0.5) -> None:
    """Timings on a shared machine are low and noisy: say so when others are using the CPUs."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(interval)
        idle1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):  # not Linux
        return
    cores = os.cpu_count() or 1
    busy = cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    if busy > 0.25:
        print(
            f"WARNING: other processes keep {busy:.1f} of {cores} CPU cores busy; "
            "the timings below will be low and noisy"
        )


def query_loss_after_adaptation(model: nn.Module, batch: TaskBatch) -> float:
    """Mean query loss of the trained weights after one inner step, computed by our engine."""
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    maml = MAML(model, regression_loss(), inner_lr=INNER_LR, inner_steps=1, first_order=True)
    return maml.outer_loss(params, batch).item()


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000, help="timed meta-iterations per library")
    parser.add_argument("--warmup", type=int, default=20, help="untimed meta-iterations first")
    parser.add_argument("--rounds", type=int, default=4, help="turns the libraries take")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ours"], help="time only maml-runner")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters, --rounds and --threads must be >= 1, --warmup >= 0")
    args.rounds = min(args.rounds, args.iters)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    l2l = higher = None
    if args.only == "ours":
        print(f"--only ours: skipping learn2learn and higher (for them: {INSTALL_HINT})")
    else:
        l2l, note = import_learn2learn()
        if note:
            print(note)
        higher, note = import_higher()
        if note:
            print(note)

    torch.manual_seed(args.seed)
    init = MLP(1, 1, hidden=(40, 40), activation="relu")
    generator = torch.Generator().manual_seed(args.seed)
    batch = Sinusoid().sample(META_BATCH, generator, k_shot=K_SHOT, query_size=QUERY)
    batch = to_dtype(batch, torch.float32)  # drop `info`: every library sees the same 4 tensors

    print(
        f"sinusoid MAML: MLP 1-40-40-1 ReLU, {META_BATCH} tasks, K={K_SHOT}+{QUERY}, 1 inner "
        f"step (lr {INNER_LR}), second order, Adam {OUTER_LR}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    versions = [f"{m.__name__} {_version(m.__name__)}" for m in (l2l, higher) if m]
    if versions:
        print("baselines: " + ", ".join(versions))

    warn_if_busy()

    ok = True  # the baselines' meta-gradients agree with ours
    if l2l is not None or higher is not None:
        diffs = check_gradients(init, batch, l2l, higher)
        print("\nfloat64 meta-gradient, max relative difference vs ours:")
        for name, diff in diffs.items():
            verdict = "ok" if diff <= GRAD_RTOL else f"MISMATCH (> {GRAD_RTOL:g})"
            print(f"  {name:<12} {diff:.2e}  {verdict}")
            ok = ok and diff <= GRAD_RTOL
        if not ok:
            print("ERROR: meta-gradients disagree with ours; not timing", file=sys.stderr)
            return 1

    runners = build_runners(init, l2l, higher, torch.float32)
    print(
        f"\ntiming {args.iters} meta-iterations per library "
        f"(+{args.warmup} warm-up, {args.rounds} rounds)..."
    )
    rates = benchmark(runners, batch, iters=args.iters, warmup=args.warmup, rounds=args.rounds)
    final = {r.name: query_loss_after_adaptation(r.model, batch) for r in runners}
    print_table(rates, final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
