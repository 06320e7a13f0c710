"""What the bench times: the workloads (network, task batch, inner loop) and our meta-step.

``make_ours`` is maml-run's own meta-step (``maml_runner.trainer.meta_backward`` over the
learner of ``--algorithm``: ``maml_runner.maml.MAML`` or one of its family, Adam fused=True over
θ and the learner's own meta-parameters), so that the bench times what a run executes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maml_runner.maml import MAML, TaskBatch, TaskLoss, classification_loss, regression_loss
from maml_runner.maml.engine import FuncEngine, use_engine
from maml_runner.maml.family import ANIL, MAMLpp, MetaSGD
from maml_runner.maml.functional import unsupported
from maml_runner.models import MLP, Conv4, ResNet12
from maml_runner.tasks.sinusoid import Sinusoid
from maml_runner.trainer import meta_backward

OUTER_LR = 1e-3

# --algorithm: the learner ours runs, and how its headers name it.
ALGORITHMS = {"maml": "MAML", "metasgd": "Meta-SGD", "anil": "ANIL", "mamlpp": "MAML++"}
# MAML++ as the bench runs it: multi-step loss and per-step rates (LSLR), second order; no
# BNWB, no derivative-order annealing. The bench never advances the epoch, so the multi-step
# loss keeps its epoch-0 weights, 1/N for each of the N steps (msl_epochs only has to be >= 1).
MAMLPP_FLAGS = dict(msl=True, msl_epochs=10, lslr=True, da_epochs=0, bnwb=False)


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

    def learner(
        self,
        model: nn.Module,
        algorithm: str = "maml",
        *,
        first_order: bool = False,
        msl: bool = True,
    ) -> MAML:
        """Ours: the learner of ``algorithm`` (see ``ALGORITHMS``) with the workload's inner loop.

        Meta-SGD's α starts at the workload's ``inner_lr`` in every element (as learn2learn's
        ``MetaSGD(lr=...)``); MAML++ runs ``MAMLPP_FLAGS`` (``msl=False``: only the last step's
        query loss, for the final loss the tables print).
        """
        common = dict(inner_steps=self.inner_steps, first_order=first_order)
        loss = self.task_loss()
        if algorithm == "maml":
            return MAML(model, loss, inner_lr=self.inner_lr, **common)
        if algorithm == "metasgd":
            return MetaSGD(model, loss, lr_init=(self.inner_lr, self.inner_lr), **common)
        if algorithm == "anil":
            return ANIL(model, loss, inner_lr=self.inner_lr, **common)
        if algorithm == "mamlpp":
            flags = {**MAMLPP_FLAGS, "msl": msl}
            return MAMLpp(model, loss, inner_lr=self.inner_lr, **flags, **common)  # type: ignore[arg-type]
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")


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


def _resnet12_workload(name: str, *, widths: list[int], meta_batch: int, steps: int) -> Workload:
    """miniImageNet-shaped 5-way 1-shot (84×84×3, 15 query/class) on ``ResNet12``."""
    return Workload(
        name=name,
        summary=(
            f"ResNet-12 {'-'.join(map(str, widths))} batch norm, 84x84x3; 5-way 1-shot, "
            f"15 query/class, {meta_batch} tasks, {steps} inner steps (lr 0.01), second order, "
            f"Adam {OUTER_LR:g}"
        ),
        build_model=lambda: ResNet12(3, 84, 5, widths=widths),
        sample=_image_batch(meta_batch, 5, 1, 15, 3, 84),
        task_loss=classification_loss,
        baseline_loss=F.cross_entropy,
        inner_lr=0.01,
        inner_steps=steps,
        check_tasks=1,
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
        _resnet12_workload("resnet12-narrow-5w1s", widths=[16, 40, 80, 160], meta_batch=4, steps=5),
    )
}
# Run by default (no --workload): the rows the README's table has measured all along.
DEFAULT_WORKLOADS = ("sinusoid", "omniglot-5w1s", "omniglot-20w1s", "miniimagenet-5w1s")


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


# ------------------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """One implementation: ``meta_grad`` writes d(outer loss)/d(meta-parameters) into ``.grad``.

    The meta-parameters are θ (``model``'s parameters) and ``learned``: the algorithm's own
    (Meta-SGD's α, MAML++'s per-step rates), by ours' names (``lr.<parameter>``), whichever
    library holds them.
    """

    name: str
    model: nn.Module
    meta_grad: Callable[[TaskBatch], Tensor]
    optimizer: torch.optim.Optimizer
    learned: dict[str, Tensor] = field(default_factory=dict)
    params: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [*self.model.parameters(), *self.learned.values()]

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
    workload: Workload,
    lib: Any,
    model: nn.Module,
    tasks_per_pass: int | None = None,
    algorithm: str = "maml",
) -> Runner:
    """maml-run's meta-step: ``meta_backward`` in passes of ``tasks_per_pass`` (None: one),
    Adam over θ and the learner's own meta-parameters (as ``build.build_optimizer``)."""
    learner = workload.learner(model, algorithm)
    params = dict(model.named_parameters())

    def meta_grad(batch: TaskBatch) -> Tensor:
        return meta_backward(learner, params, batch, tasks_per_pass)

    learned = dict(learner.learned.named_parameters())
    optimizer = torch.optim.Adam([*model.parameters(), *learned.values()], lr=OUTER_LR, fused=True)
    return Runner("ours", model, meta_grad, optimizer, learned)


def make_general_path(
    workload: Workload,
    lib: Any,
    model: nn.Module,
    tasks_per_pass: int | None = None,
    algorithm: str = "maml",
) -> Runner:
    """maml-run's meta-step with the model forced onto the torch.func path (``FuncEngine``).

    For models the batched layers also cover, so the two engines compare on the same weights.
    """
    use_engine(model, FuncEngine(model, "forced by the bench"))
    runner = make_ours(workload, lib, model, tasks_per_pass, algorithm)
    runner.name = "general"
    return runner


def batched(workload: Workload) -> bool:
    """Whether the batched layers cover the workload's model (else ours is the general path)."""
    return unsupported(workload.build_model()) is None
