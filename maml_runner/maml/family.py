"""MAML's family on the same engine: Meta-SGD, ANIL and MAML++, each one screen.

Each is a learner like ``core.MAML``: ``outer_loss(θ, batch)`` for meta-training,
``adaptation(θ, batch, steps)`` for meta-test, and ``learned``, its own meta-parameters beside θ
(optimised, checkpointed and checked like θ). They differ from MAML only in the step size they
hand ``engine.step`` (a ``StepSize``: a learned tensor per element or per layer, or only the
head's names) and, for MAML++, in which losses of the unrolled inner loop count.

References:
    Li, Zhou, Chen & Li (2017), Meta-SGD: Learning to Learn Quickly for Few-Shot Learning,
    arXiv:1707.09835 (θ'ᵢ = θ − α ∘ ∇L(θ), α meta-learned with θ).
    Raghu, Raghu, Bengio & Vinyals (2020), Rapid Learning or Feature Reuse? Towards
    Understanding the Effectiveness of MAML, ICLR, arXiv:1909.09157 (ANIL: the head alone adapts).
    Antoniou, Edwards & Storkey (2019), How to train your MAML, ICLR, arXiv:1810.09502 (MAML++:
    MSL, DA, LSLR, BNWB; CA is ``outer.scheduler``, BNRS the model's per-step batch-norm
    statistics, ``batch_norm.py``), and the authors' code
    HowToTrainYourMAMLPytorch (``few_shot_learning_system.py``: the MSL weights, the DA switch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from maml_runner.errors import InvalidArgument, positive_int, require
from maml_runner.maml.core import MAML, Learned, Predict, check_inner, per_task, stepped_adaptation
from maml_runner.maml.engine import StepSize, engine_for, meta_training
from maml_runner.maml.functional import Params
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss


class MetaSGD(MAML):
    """Meta-SGD: MAML whose inner step size α is a learned tensor shaped like each parameter.

    Args:
        lr_init: ``(low, high)``: every element of α starts uniform in [low, high] (the global
            torch RNG draws it, after the model); low = high gives a constant.
        (the rest as ``MAML``; ``inner_lr`` is unused: α replaces it)
    """

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        *,
        inner_steps: int,
        lr_init: Sequence[float],
        first_order: bool = False,
    ) -> None:
        low, high = lr_init
        ok = 0 <= low <= high
        require(ok, "lr_init", list(lr_init), "give [low, high] with 0 <= low <= high")
        super().__init__(
            model, task_loss, inner_lr=low, inner_steps=inner_steps, first_order=first_order
        )
        alpha = {}
        for n, p in model.named_parameters():
            init = torch.empty(p.shape, dtype=torch.float64).uniform_(low, high)
            alpha[f"lr.{n}"] = init.to(p.device, p.dtype)
        self.learned = Learned(alpha)

    def step_size(self, step: int) -> StepSize:
        return self.learned.group("lr")

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """Mean over tasks of the query loss of θ'ᵢ after steps θ ← θ − α ∘ ∇L_support(θ)."""
        return inner_loop_loss(self, params, batch, not self.first_order)

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: steps of the learned α (no graph kept)."""
        alpha = {n: a.detach() for n, a in self.step_size(0).items()}
        return stepped_adaptation(self.model, self.task_loss, params, batch, steps, lambda s: alpha)


class ANIL(MAML):
    """ANIL (almost no inner loop): MAML whose inner loop adapts only the head's parameters.

    The body is meta-learned by the outer loop but held fixed in every inner step, at
    meta-training and at meta-test alike.

    Args:
        head: the parameter names (or module names, covering their parameters) adapted in the
            inner loop; None: the parameters of the model's last module that has any.
        (the rest as ``MAML``)
    """

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        head: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model, task_loss, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order
        )
        self.head = head_names(model, head)

    def step_size(self, step: int) -> StepSize:
        return dict.fromkeys(self.head, self.inner_lr)

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """MAML's outer loss with the inner steps moving the head alone."""
        return inner_loop_loss(self, params, batch, not self.first_order)

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: plain steps of size α on the head alone."""
        return stepped_adaptation(self.model, self.task_loss, params, batch, steps, self.step_size)


def head_names(model: nn.Module, head: Sequence[str] | None) -> list[str]:
    """The parameter names ``head`` covers (see ``ANIL``); refuses a name the model lacks."""
    names = [n for n, _ in model.named_parameters()]
    if head is None:
        owners = [m for _, m in model.named_modules() if list(m.parameters(recurse=False))]
        last = {id(p) for p in owners[-1].parameters(recurse=False)}
        return [n for n, p in model.named_parameters() if id(p) in last]
    covered = []
    for entry in head:
        hits = [n for n in names if n == entry or n.startswith(entry + ".")]
        if not hits:
            raise InvalidArgument(
                "head",
                list(head),
                f"{entry} names no parameter of the model (its parameters: {', '.join(names)})",
            )
        covered += [n for n in hits if n not in covered]
    return covered


def inner_loop_loss(learner: MAML, params: Params, batch: TaskBatch, second: bool) -> Tensor:
    """Query loss after ``learner.inner_steps`` steps of ``learner.step_size(s)``, mean over
    tasks (MAML's outer loss with another step size)."""
    engine, steps = engine_for(learner.model), learner.inner_steps
    fast = per_task(params, batch.num_tasks)
    with meta_training(learner.model):
        for s in range(steps):
            fast = engine.step(
                learner.task_loss,
                fast,
                batch.support_x,
                batch.support_y,
                learner.step_size(s),
                second,
                inner_step=s,
            )
        pred = engine.forward(fast, batch.query_x, steps)
    return learner.task_loss.loss(pred, batch.query_y).mean()


class MAMLpp(MAML):
    """MAML++: MAML with each of the paper's fixes a flag (all off: MAML exactly).

    Args:
        msl: multi-step loss: the query losses after every inner step, weighted by
            ``msl_weights`` (annealed towards the last step), for the first ``msl_epochs``
            epochs; after them (and with msl off) only the last step's.
        da_epochs: derivative-order annealing: first order while the epoch is < da_epochs, then
            second order (unless ``first_order``); 0: no first-order phase.
        lslr: a learned inner step size per parameter tensor and inner step, initialised to
            ``inner_lr`` (``learned``: ``lr.<name>`` of shape ``[inner_steps]``).
        bnwb: per-step batch-norm weights and biases, not adapted in the inner loop: step 0
            uses the model's own, step s ≥ 1 ``learned`` ``bn.<name>[s - 1]`` (initialised to
            the model's). The forward of inner step s and the predictor after step s + 1 use
            set s, as in the authors' code.
        epoch_length: meta-iterations per epoch, the unit of the MSL and DA schedules.
        (the rest as ``MAML``)

    At meta-test (and validation) adaptation is first order, with the learned rates and BN
    sets; steps beyond ``inner_steps`` reuse the last step's.
    """

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool = False,
        msl: bool = False,
        msl_epochs: int = 0,
        da_epochs: int = 0,
        lslr: bool = False,
        bnwb: bool = False,
        epoch_length: int = 1,
    ) -> None:
        check_inner(inner_lr, inner_steps)
        positive_int("inner_steps", inner_steps, minimum=1)
        positive_int("msl_epochs", msl_epochs, minimum=1 if msl else 0)
        positive_int("da_epochs", da_epochs, minimum=0)
        positive_int("epoch_length", epoch_length, minimum=1)
        super().__init__(
            model, task_loss, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order
        )
        self.msl, self.msl_epochs, self.da_epochs = msl, msl_epochs, da_epochs
        self.lslr, self.epoch_length = lslr, epoch_length
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn = {id(p) for m in norms for p in m.parameters(recurse=False)}
        self.bn_names = [n for n, p in model.named_parameters() if id(p) in bn] if bnwb else []
        self.inner_names = [n for n, _ in model.named_parameters() if n not in self.bn_names]
        learned = {}
        for n, p in model.named_parameters():
            if lslr and n in self.inner_names:
                learned[f"lr.{n}"] = torch.full(
                    (inner_steps,), float(inner_lr), dtype=p.dtype, device=p.device
                )
            if n in self.bn_names and inner_steps > 1:
                learned[f"bn.{n}"] = p.detach().clone().unsqueeze(0).repeat(inner_steps - 1, 1)
        self.learned = Learned(learned)
        self.iteration = 0

    def at_iteration(self, iteration: int) -> None:
        """Told by the update before each meta-iteration (the MSL and DA schedules read it)."""
        self.iteration = iteration

    def step_size(self, step: int, learned: Params) -> StepSize:
        """Step ``step``'s inner step size: learned per layer (LSLR), else α; BN held (BNWB)."""
        if self.lslr:
            s = min(step, self.inner_steps - 1)
            return {n: learned[f"lr.{n}"][s] for n in self.inner_names}
        return dict.fromkeys(self.inner_names, self.inner_lr) if self.bn_names else self.inner_lr

    def weights_at(self, fast: Params, step: int, learned: Params) -> Params:
        """``fast`` with step ``step``'s batch-norm weights (BNWB), per task."""
        s = min(step, self.inner_steps - 1)
        if not self.bn_names or s == 0:
            return fast
        tasks = next(iter(fast.values())).shape[0]
        return {**fast, **per_task({n: learned[f"bn.{n}"][s - 1] for n in self.bn_names}, tasks)}

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """Σₛ wₛ · (mean over tasks of the query loss after step s + 1); w = MSL's or the last."""
        epoch = self.iteration // self.epoch_length
        second = not self.first_order and epoch >= self.da_epochs
        weights = msl_weights(self.inner_steps, epoch, self.msl_epochs) if self.msl else None
        engine, learned = engine_for(self.model), dict(self.learned.named_parameters())
        fast, losses = per_task(params, batch.num_tasks), []
        with meta_training(self.model):
            for s in range(self.inner_steps):
                at = self.weights_at(fast, s, learned)
                fast = engine.step(
                    self.task_loss,
                    at,
                    batch.support_x,
                    batch.support_y,
                    self.step_size(s, learned),
                    second,
                    inner_step=s,
                )
                if weights is not None or s == self.inner_steps - 1:
                    pred = engine.forward(self.weights_at(fast, s, learned), batch.query_x, s + 1)
                    losses.append(self.task_loss.loss(pred, batch.query_y).mean())
        if weights is None:
            return losses[-1]
        return sum(w * loss for w, loss in zip(weights, losses))

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: first-order steps with the learned rates and per-step BN weights."""
        learned = {n: p.detach() for n, p in self.learned.named_parameters()}
        return stepped_adaptation(
            self.model,
            self.task_loss,
            params,
            batch,
            steps,
            lambda s: self.step_size(s, learned),
            lambda fast, s: self.weights_at(fast, s, learned),
        )


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float] | None:
    """MAML++'s per-step loss weights at ``epoch`` (None once ``epoch >= msl_epochs``: then only
    the last step's loss counts, with weight 1).

    All start at 1/N; each epoch every non-final weight falls by 1/(N·E) down to 0.03/N, and the
    final one rises by (N−1)/(N·E) up to 1 − (N−1)·0.03/N (N = ``steps``, E = ``msl_epochs``).

    References:
        Antoniou et al. (2019) §4 (MSL), and the authors' code
        (``get_per_step_loss_importance_vector``), whose schedule this is.
    """
    if epoch >= msl_epochs:
        return None
    n, decay, floor = steps, 1.0 / (steps * msl_epochs), 0.03 / steps
    weights = [max(1.0 / n - epoch * decay, floor) for _ in range(n - 1)]
    weights.append(min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor))
    return weights
