"""The baselines: learn2learn's and higher's MAML, each as its own MAML example writes it.

Both are optional. A missing one is reported in one line and skipped. learn2learn imports
torchvision at import time but its MAML never uses it; if torchvision is absent or cannot load
(e.g. a CUDA torchvision wheel beside a CPU-only torch), a stand-in module is put in its place so
that ``import learn2learn`` succeeds.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.workloads import OUTER_LR, Runner, Workload
from maml_runner.maml import TaskBatch
from maml_runner.maml.family import head_names

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

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """``from gym.envs.registration import register``; ``register(...)``: a no-op."""


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serve the package ``name`` (``torchvision``, ``gym``) and its sub-modules as stand-ins."""

    def __init__(self, name: str = "torchvision") -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == self.name or fullname.startswith(self.name + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so that `import torchvision.x.y` works


def _ensure_gym_importable() -> str | None:
    """Make ``import gym`` succeed (learn2learn's RL helpers import it; its MAML never uses it)."""
    if importlib.util.find_spec("gym") is not None:
        return None
    sys.meta_path.insert(0, _StandInFinder("gym"))
    return "gym not installed; using a stand-in (learn2learn's MAML needs none)"


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
    notes = [n for n in (_ensure_torchvision_importable(), _ensure_gym_importable()) if n]
    note = "; ".join(notes) or None
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


def _l2l_meta_grad(
    wrapped: Any, workload: Workload, body: nn.Module | None = None, *, each_task: bool = True
) -> Callable[[TaskBatch], Tensor]:
    """learn2learn's examples: per task clone, adapt on the support set, query loss.

    ``wrapped`` is an ``l2l.algorithms.MAML`` or ``MetaSGD`` (the same ``clone`` / ``adapt``).
    ``body``: ANIL's pattern, the features computed once by the body and ``wrapped`` holding
    only the head. ``each_task``: backward of each task's share of the mean right after its
    adaptation, as learn2learn's examples do (its tutorial: to free each task's graph as early
    as possible); False: one backward of the mean over tasks, all tasks' graphs held at once
    (the MAML row, as it has been measured).
    """
    loss_fn, steps = workload.baseline_loss, workload.inner_steps

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype, device=batch.query_x.device)
        for t in range(batch.num_tasks):
            support_x, query_x = batch.support_x[t], batch.query_x[t]
            if body is not None:  # each set alone: batch norm sees the same batches as ours
                support_x, query_x = body(support_x), body(query_x)
            learner = wrapped.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(support_x), batch.support_y[t]))
            query_loss = loss_fn(learner(query_x), batch.query_y[t])
            if each_task:
                (query_loss / batch.num_tasks).backward()
                query_loss = query_loss.detach()
            total = total + query_loss
        loss = total / batch.num_tasks
        if not each_task:
            loss.backward()
        return loss.detach()

    return meta_grad


def make_learn2learn(workload: Workload, l2l: Any, model: nn.Module) -> Runner:
    """MAML: ``l2l.algorithms.MAML`` as learn2learn's MAML examples use it, but one backward
    of the summed query losses (the row as it has been measured; its examples backward each
    task, which holds less memory)."""
    maml = l2l.algorithms.MAML(model, lr=workload.inner_lr, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), OUTER_LR)
    meta_grad = _l2l_meta_grad(maml, workload, each_task=False)
    return Runner("learn2learn", model, meta_grad, optimizer)


def make_learn2learn_metasgd(workload: Workload, l2l: Any, model: nn.Module) -> Runner:
    """Meta-SGD: ``l2l.algorithms.MetaSGD``, α initialised to the workload's ``inner_lr``."""
    meta = l2l.algorithms.MetaSGD(model, lr=workload.inner_lr, first_order=False)
    alpha = {f"lr.{n}": lr for (n, _), lr in zip(model.named_parameters(), meta.lrs, strict=True)}
    optimizer = torch.optim.Adam(meta.parameters(), OUTER_LR)
    return Runner("learn2learn", model, _l2l_meta_grad(meta, workload), optimizer, alpha)


def anil_split(model: nn.Module) -> str | None:
    """Why learn2learn's ANIL pattern does not fit ``model`` (None: it does).

    The pattern needs the body and the head as modules of their own: an ``nn.Sequential``
    whose last module holds the head, the parameters ours' ANIL adapts by default.
    """
    if isinstance(model, nn.Sequential):
        last = len(model) - 1
        head = [f"{last}.{n}" for n, _ in model[-1].named_parameters()]
        if head and head_names(model, None) == head:
            return None
    return (
        f"{type(model).__name__} is not an nn.Sequential ending in its head, so learn2learn's "
        "ANIL pattern (body once, MAML on the head) has no body to call"
    )


def make_learn2learn_anil(workload: Workload, l2l: Any, model: nn.Module) -> Runner:
    """ANIL as learn2learn's examples/vision/anil_fc100.py: the body once per set,
    ``l2l.algorithms.MAML`` wrapping only the head (``model[-1]``)."""
    assert isinstance(model, nn.Sequential), anil_split(model)
    body = nn.Sequential(*list(model)[:-1])  # the same modules (MLP, Conv4: no slicing)
    head = l2l.algorithms.MAML(model[-1], lr=workload.inner_lr)
    optimizer = torch.optim.Adam(model.parameters(), OUTER_LR)
    return Runner("learn2learn", model, _l2l_meta_grad(head, workload, body), optimizer)


def make_learn2learn_mamlpp(workload: Workload, l2l: Any, model: nn.Module) -> Runner:
    """MAML++ (MSL + LSLR, second order) in the pattern of learn2learn's MAML++ example.

    learn2learn has no MAML++ class, only examples (examples/vision/mamlpp/): ``clone()`` of an
    ``l2l.algorithms.MAML``, and each inner step re-routes every parameter p to
    p − rate[step]·∇p through learn2learn's ``update_module`` (as the example's
    ``maml_pp_update``), then adds step weight × query loss (its multi-step loss, at its
    initial weights 1/N), and a backward of each task's loss after its adaptation, as the
    example. The rates are per parameter tensor and step, as ours (the example shares one per
    layer), initialised to ``inner_lr``.
    """
    maml = l2l.algorithms.MAML(model, lr=workload.inner_lr, first_order=False)
    names = [n for n, _ in model.named_parameters()]
    rates = {
        f"lr.{n}": nn.Parameter(
            torch.full((workload.inner_steps,), workload.inner_lr, dtype=p.dtype, device=p.device)
        )
        for n, p in model.named_parameters()
    }
    steps, loss_fn = workload.inner_steps, workload.baseline_loss
    step_weight = 1.0 / steps  # the example's MSL weights before any annealing

    def meta_grad(batch: TaskBatch) -> Tensor:
        total = torch.zeros((), dtype=batch.query_x.dtype, device=batch.query_x.device)
        for t in range(batch.num_tasks):
            learner, task_loss = maml.clone(), torch.zeros_like(total)
            for s in range(steps):
                support_loss = loss_fn(learner(batch.support_x[t]), batch.support_y[t])
                params = list(learner.parameters())
                grads = torch.autograd.grad(support_loss, params, create_graph=True)
                for n, p, g in zip(names, params, grads, strict=True):
                    p.update = -rates[f"lr.{n}"][s] * g
                learner.module = l2l.utils.update_module(learner.module)
                query_loss = loss_fn(learner(batch.query_x[t]), batch.query_y[t])
                task_loss = task_loss + step_weight * query_loss
            task_loss = task_loss / batch.num_tasks
            task_loss.backward()
            total = total + task_loss.detach()
        return total

    optimizer = torch.optim.Adam([*maml.parameters(), *rates.values()], OUTER_LR)
    return Runner("learn2learn", model, meta_grad, optimizer, dict(rates))


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


Baseline = Callable[[Workload, Any, nn.Module], Runner]
# Per --algorithm, the baselines that have a counterpart of it, and what each one is.
BASELINES: dict[str, dict[str, Baseline]] = {
    "maml": {"learn2learn": make_learn2learn, "higher": make_higher},
    "metasgd": {"learn2learn": make_learn2learn_metasgd},
    "anil": {"learn2learn": make_learn2learn_anil},
    "mamlpp": {"learn2learn": make_learn2learn_mamlpp},
}
COUNTERPARTS = {
    "metasgd": "learn2learn: l2l.algorithms.MetaSGD, α initialised to the workload's inner lr",
    "anil": "learn2learn: its ANIL example's pattern (examples/vision/anil_fc100.py): the body "
    "once per set, l2l.algorithms.MAML on the head",
    "mamlpp": "learn2learn: no MAML++ class; its example's pattern (examples/vision/mamlpp/): "
    "MAML.clone(), per-step rates by update_module, multi-step loss (MSL + LSLR only)",
}


def unsupported(algorithm: str, library: str, workload: Workload) -> str | None:
    """Why ``library`` has no counterpart of ``algorithm`` on ``workload`` (None: it has)."""
    if algorithm == "anil" and library == "learn2learn":
        return anil_split(workload.build_model())
    return None
