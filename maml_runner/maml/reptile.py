"""Reptile (Nichol, Achiam & Schulman 2018): move θ toward the weights each task trains to.

Each task of a meta-batch trains from θ for k steps of SGD or Adam on minibatches of its own
data, giving θ'ᵢ; the outer update is θ ← θ + ε·(mean_i θ'ᵢ − θ) (the paper's batched version,
Algorithm 2). Here that update is the *pseudo-gradient* θ − mean_i θ'ᵢ handed to the outer
optimiser: plain SGD with learning rate ε is exactly the paper's step, the outer learning-rate
schedule (``outer.scheduler``, LinearLR to 0 as the authors' code) anneals ε, and checkpoints,
resume, passes of tasks and torchrun's all-reduce work unchanged, because ``outer_loss`` returns
a surrogate whose gradient with respect to θ is the pseudo-gradient (see ``Reptile.outer_loss``).

All tasks run together through the model's engine (``engine.py``): per-task weights
``[T, *shape]``, one forward and backward per inner step for the whole meta-batch, and each
task's Adam moments ``[T, *shape]`` beside its weights. No derivative is taken through the
inner loop (Reptile is first order by construction).

Minibatches follow the authors' code: without replacement, the task's examples are visited in
a fresh random order per pass over them and cut into consecutive minibatches (one may straddle
two passes). The order of meta-training step s is a pure function of (seed, s)
(``OrderedStream``), so a resumed run, any split into passes and any number of torchrun ranks
see the same minibatches; at meta-test it comes from a fixed seed, so a meta-test is the same
every time it runs.

Evaluation, as the paper: *transductive* classifies all query examples in one batch, so batch
norm normalises with the query set's statistics; *non-transductive* classifies each query
example alone, in a batch of the support set plus that one example (the authors' code keeps
only that example's prediction), so no query example sees another. A model whose examples are
independent (no batch norm, batched layers only) gives the same predictions either way, and the
per-example path is skipped for it.

Where this differs from the authors' code: their inner Adam's moments are TensorFlow slots
that are not reset with the weights, so one Adam state runs on across all tasks and
meta-iterations (meta-test starts from it and restores it after). Here each task's Adam starts
from zero moments at step 1, in training and at meta-test, which keeps the tasks of a
meta-batch independent: the batched, passed and distributed updates are then exact, and a
meta-test depends on θ alone.

References:
    Nichol, Achiam & Schulman (2018), On First-Order Meta-Learning Algorithms,
    arXiv:1803.02999: Algorithm 1 (serial), Algorithm 2 (batched), §5 transduction, Appendix A
    hyperparameters. openai/supervised-reptile (the authors' code): ``reptile.py``
    (``_mini_batches``, ``_test_predictions``), ``models.py`` (Adam with β1 = 0).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor, nn

from maml_runner.errors import choose, is_number, positive_int, require
from maml_runner.maml.core import Learned, Predict, per_task
from maml_runner.maml.engine import BatchedEngine, engine_for
from maml_runner.maml.functional import Params
from maml_runner.tasks.base import make_generator, stream_seed
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss

INNER_OPTIMIZERS = ("sgd", "adam")
ORDER = "inner_order"  # TaskBatch.info key: [T, steps, batch] example indices of the minibatches


def minibatch_order(
    num_tasks: int, examples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Tensor:
    """Example indices ``[T, steps, batch_size]`` of each task's inner minibatches.

    Without replacement, as the authors' ``_mini_batches``: every pass over a task's
    ``examples`` examples is a fresh random permutation; the passes are concatenated and cut
    into ``steps`` consecutive minibatches of ``batch_size``.
    """
    total = steps * batch_size
    passes = max(1, math.ceil(total / examples))
    keys = torch.rand(num_tasks, passes, examples, generator=generator, device=generator.device)
    order = keys.argsort(-1).reshape(num_tasks, passes * examples)[:, :total]
    return order.reshape(num_tasks, steps, batch_size)


def order_seed(seed: int, step: int) -> int:
    """Generator seed of meta-training step ``step``'s minibatch order.

    Bit 31 set: never the seed of a task-stream chunk (``stream_seed``, chunk indices < 2**31),
    so the order is independent of the tasks it orders.
    """
    return stream_seed(seed, step) | (1 << 31)


class OrderedStream:
    """A ``TaskStream`` whose batches carry each task's inner minibatch order (``info[ORDER]``).

    The order of step ``s`` is drawn for the whole meta-batch from ``order_seed(seed, s)``, so
    ``batch(s).tasks(lo, hi)`` (passes, torchrun ranks) slices the same order.
    """

    def __init__(self, stream, learner: Reptile) -> None:  # noqa: ANN001 (a TaskStream)
        self.stream, self.learner = stream, learner
        self.meta_batch_size, self.device = stream.meta_batch_size, stream.device
        self.seed = stream.seed

    def batch(self, step: int) -> TaskBatch:
        batch = self.stream.batch(step)
        generator = make_generator(order_seed(self.seed, step), self.device)
        draw = self.learner.order(batch, self.learner.inner_batch_size, self.learner.inner_steps)
        order = draw(generator)
        return replace(batch, info={**(batch.info or {}), ORDER: order})


@dataclass(frozen=True)
class InnerOptimizer:
    """The inner loop's optimiser, per task: ``sgd`` (w − lr·g) or ``adam`` (torch.optim.Adam's
    update with ``betas`` and ``eps``, moments from zero at step 1)."""

    name: str
    lr: float
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8

    def init(self, params: Params) -> dict[str, Params]:
        if self.name == "sgd":
            return {}
        return {"m": {n: torch.zeros_like(w) for n, w in params.items()},
                "v": {n: torch.zeros_like(w) for n, w in params.items()}}  # fmt: skip

    def update(self, params: Params, grads: Params, state: dict[str, Params], t: int) -> Params:
        """Step ``t`` (1-based) for every task at once; ``state`` is updated in place."""
        if self.name == "sgd":
            return {n: w - self.lr * grads[n] for n, w in params.items()}
        b1, b2 = self.betas
        m, v, out = state["m"], state["v"], {}
        for n, w in params.items():
            g = grads[n]
            m[n] = torch.lerp(g, m[n], b1) if b1 else g  # β1·m + (1−β1)·g
            v[n] = v[n] * b2 + (1 - b2) * g * g
            denom = (v[n] / (1 - b2**t)).sqrt() + self.eps
            out[n] = w - self.lr * (m[n] / (1 - b1**t)) / denom
        return out


class Reptile:
    """Reptile's meta-objective (as a pseudo-gradient) and its meta-test adaptation.

    Args:
        model: any ``nn.Module`` (batched layers, else the torch.func path: ``engine.py``).
        task_loss: the per-task loss that the inner loop minimises (and metrics to report).
        inner_lr: the inner optimiser's step size (Adam's α; the paper 0.001 / 0.0005).
        inner_steps: k, inner iterations per task in meta-training (>= 1).
        inner_batch_size: examples per inner minibatch in meta-training; None: the task's
            whole support set every step.
        eval_batch_size: examples per minibatch at meta-test; None: the whole support set.
        optimizer: ``sgd`` or ``adam`` (the paper: Adam with β1 = 0).
        betas, eps: Adam's (ignored by SGD).
        transductive: meta-test predicts all query examples in one batch (batch-norm statistics
            from the query set); False: each one with the support set (module docstring).
        eval_seed: seed of the meta-test minibatch order.

    Raises:
        InvalidArgument: a bad value, named by its parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        task_loss: TaskLoss,
        *,
        inner_lr: float,
        inner_steps: int,
        inner_batch_size: int | None,
        eval_batch_size: int | None,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        transductive: bool = True,
        eval_seed: int = 0,
    ) -> None:
        number = is_number(inner_lr)
        require(number and inner_lr >= 0, "inner_lr", inner_lr, "the inner step size must be >= 0")
        positive_int("inner_steps", inner_steps)  # 0 steps: θ' = θ, nothing to move toward
        for name, size in (("inner_batch_size", inner_batch_size),
                           ("eval_batch_size", eval_batch_size)):  # fmt: skip
            if size is not None:
                positive_int(name, size)
        choose("inner_optimizer", optimizer, INNER_OPTIMIZERS)
        for name, beta in (("adam_beta1", betas[0]), ("adam_beta2", betas[1])):
            require(0 <= beta < 1, name, beta, "an Adam β must lie in [0, 1)")
        require(eps > 0, "adam_eps", eps, "must be > 0")
        self.model, self.task_loss, self.learned = model, task_loss, Learned()  # none of its own
        self.inner_lr, self.inner_steps = inner_lr, inner_steps
        self.inner_batch_size, self.eval_batch_size = inner_batch_size, eval_batch_size
        self.optimizer = InnerOptimizer(optimizer, inner_lr, tuple(betas), eps)
        self.transductive, self.eval_seed = transductive, eval_seed
        engine = engine_for(model)
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        # per-example outputs: the batched layers without batch norm mix no examples
        self._examples_independent = isinstance(engine, BatchedEngine) and not norms

    def ordered(self, stream) -> OrderedStream:  # noqa: ANN001 (a TaskStream)
        """``stream`` with each meta-batch's inner minibatch order (for meta-training)."""
        return OrderedStream(stream, self)

    def order(self, batch: TaskBatch, batch_size: int | None, steps: int):  # noqa: ANN201
        """``generator → [T, steps, B]`` minibatch indices for ``batch``'s support sets."""
        num_tasks, examples = batch.support_x.shape[:2]
        size = examples if batch_size is None else batch_size
        if batch_size is None:  # the whole set each step: no randomness needed
            whole = torch.arange(examples, device=batch.support_x.device)
            return lambda generator: whole.expand(num_tasks, steps, examples)
        return partial(minibatch_order, num_tasks, examples, size, steps)

    def _train(
        self, params: Params, batch: TaskBatch, order: Tensor, optimizer: InnerOptimizer
    ) -> Iterator[Params]:
        """θ'ᵢ after 1, 2, ... inner steps from ``params`` (per task, detached) on minibatches
        ``order`` ``[T, steps, B]`` of each task's support set."""
        engine = engine_for(self.model)
        x, y = batch.support_x, batch.support_y
        rows = torch.arange(batch.num_tasks, device=x.device).unsqueeze(1)
        fast = {n: w.detach() for n, w in params.items()}
        state = optimizer.init(fast)  # per task: zero moments (module docstring)
        for step in range(order.shape[1]):
            index = order[:, step]
            with torch.enable_grad():
                leaves = {n: w.detach().requires_grad_() for n, w in fast.items()}
                loss = self.task_loss.loss(engine.forward(leaves, x[rows, index]), y[rows, index])
                # the tasks' losses are independent, so the gradient of the sum is each task's
                grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
            with torch.no_grad():
                fast = optimizer.update(fast, dict(zip(fast, grads)), state, step + 1)
            yield fast

    def adapted(self, params: Params, batch: TaskBatch) -> Params:
        """θ'ᵢ of every task of ``batch`` (meta-training: ``info[ORDER]`` gives the minibatches)."""
        if batch.info is None or ORDER not in batch.info:
            raise ValueError(
                "Reptile meta-training needs each task's minibatch order: draw batches from "
                "learner.ordered(stream)"
            )
        steps = self._train(
            per_task(params, batch.num_tasks), batch, batch.info[ORDER], self.optimizer
        )
        return deque(steps, maxlen=1)[0]  # the last step's weights (keeps no others)

    def outer_loss(self, params: Params, batch: TaskBatch) -> Tensor:
        """A surrogate whose gradient in θ is the pseudo-gradient θ − mean_i θ'ᵢ and whose value
        is the mean query loss of θ'ᵢ (a figure to watch; Reptile never trains on it).

        ``s = Σ ⟨θ, sg(θ − mean θ')⟩`` has gradient ``θ − mean θ'`` exactly; returning
        ``s − sg(s) + sg(query loss)`` keeps that gradient and shows the loss. Passes and ranks
        weight it by their share of tasks (``trainer.meta_backward``), which averages exactly.
        """
        fast = self.adapted(params, batch)
        with torch.no_grad():
            pred = engine_for(self.model).forward(fast, batch.query_x)
            query = self.task_loss.loss(pred, batch.query_y).mean()
        s = sum((p * (p.detach() - fast[n].mean(0))).sum() for n, p in params.items())
        return s - s.detach() + query

    def adaptation(self, params: Params, batch: TaskBatch, steps: int) -> Iterator[Predict]:
        """At meta-test: the inner optimiser for ``steps`` steps on minibatches of
        ``eval_batch_size`` from each support set; predicts transductively or not."""
        generator = make_generator(self.eval_seed, batch.support_x.device)
        order = self.order(batch, self.eval_batch_size, steps)(generator)
        theta = per_task({n: p.detach() for n, p in params.items()}, batch.num_tasks)
        yield self._predictor(theta, batch.support_x)
        for fast in self._train(theta, batch, order, self.optimizer):
            yield self._predictor(fast, batch.support_x)

    def _predictor(self, fast: Params, support_x: Tensor) -> Predict:
        forward = partial(engine_for(self.model).forward, fast)
        if self.transductive or self._examples_independent:
            return forward

        def one_at_a_time(x: Tensor) -> Tensor:
            """Each example of ``x`` ``[T, Q, ...]`` in a batch of the support set and itself."""
            outs = [forward(torch.cat([support_x, x[:, j : j + 1]], 1))[:, -1]
                    for j in range(x.shape[1])]  # fmt: skip
            return torch.stack(outs, 1)

        return one_at_a_time
