"""MAML for RL: a policy-gradient inner step, a TRPO (or any torch.optim) outer step (§5.3).

One meta-iteration: draw T tasks; with θ, sample K episodes of each task and adapt
θ'ᵢ = θ − α∇θ L_PG(θ; episodes of task i); with θ'ᵢ, sample K more; move θ by TRPO on the
mean over tasks of the post-update surrogate, whose gradient flows back through the inner
policy-gradient step (second order) unless ``first_order``.

The inner loss is the reference code's: −mean(log π(a|s)·Â) with advantages fixed by the
samples. Its second derivative through θ'ᵢ is what the reference code and pytorch-maml-rl
differentiate; the term from the pre-update sampling distribution's dependence on θ (which DiCE
would add) is left out, as there.

References:
    Finn, Abbeel & Levine (2017), §5.3 and Algorithm 3; Williams (1992), REINFORCE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from maml_runner.errors import choose, positive_int, require
from maml_runner.maml import per_task
from maml_runner.maml.core import check_inner
from maml_runner.maml.engine import inner_update
from maml_runner.maml.functional import Params
from maml_runner.models.policy import GaussianPolicy, kl_divergence, log_prob
from maml_runner.rl.envs import VectorEnv
from maml_runner.rl.episodes import SAMPLINGS, Episodes, rollout, with_advantages
from maml_runner.rl.trpo import TRPO, Objective
from maml_runner.tasks.base import make_generator, stream_seed


def _masked_task_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``[T, M, H]`` over each task's live steps, ``[T]``."""
    return (values * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)


def pg_loss(policy: GaussianPolicy, params: Params, episodes: Episodes) -> Tensor:
    """Vanilla policy-gradient loss of each task, ``[T]``: −mean(log π(a|s)·Â)."""
    episodes = episodes.packed()
    mean, log_std = policy.distribution(params, episodes.flat_obs())
    logp = log_prob(mean, log_std, episodes.flat_actions()).view_as(episodes.mask)
    return -_masked_task_mean(logp * episodes.advantages, episodes.mask)


@dataclass
class AdaptationResult:
    returns: Tensor  # [steps+1, T]: mean undiscounted return of each task after s steps
    episodes: list[Episodes]  # the episodes sampled after each step
    params: Params  # θ'ᵢ after the last step (detached, per task)


class MetaRL:
    """The MAML-TRPO learner (and, with ``inner_steps=0``, the multi-task pretrained baseline).

    It samples episodes, adapts with policy-gradient steps and builds the outer objective; the
    tasks come from an ``RLTaskStream`` and the update is ``trpo_step`` (or, with a
    ``torch.optim`` outer optimiser, ``outer_optimizer_step``): learner, stream, update, the
    same three parts as a supervised run.

    Raises:
        InvalidArgument: ``inner_lr`` < 0, ``inner_steps`` not an integer >= 0,
            ``episodes_per_task`` or ``horizon`` not an integer >= 1, ``discount``
            outside (0, 1], or a ``sampling`` not in ``SAMPLINGS``.
    """

    def __init__(
        self,
        env: VectorEnv,
        policy: GaussianPolicy,
        *,
        inner_lr: float,
        inner_steps: int,
        first_order: bool,
        episodes_per_task: int,
        horizon: int,
        discount: float,
        normalize_advantages: bool,
        sampling: str = "episodes",
    ) -> None:
        check_inner(inner_lr, inner_steps)
        choose("sampling", sampling, SAMPLINGS)
        positive_int("episodes_per_task", episodes_per_task)
        positive_int("horizon", horizon)
        require(0 < discount <= 1, "discount", discount, "need 0 < discount <= 1")
        self.env, self.policy = env, policy
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.episodes_per_task, self.horizon = episodes_per_task, horizon
        self.discount, self.normalize = discount, normalize_advantages
        self.sampling = sampling
        self.params: Params = dict(policy.named_parameters())

    def sample(
        self,
        params: Params,
        tasks: Tensor,
        generator: torch.Generator,
        episodes_per_task: int | None = None,
        pooled: bool = False,
    ) -> Episodes:
        """Episodes of each task under ``params`` (``episodes_per_task``: K by default; with
        ``sampling=steps``, whole ones until K·horizon time steps; ``pooled``: a meta-training
        batch, which ``sampling=rllab`` samples as one)."""
        params = {n: p.detach() for n, p in params.items()}
        episodes = rollout(
            self.env,
            self.policy,
            params,
            tasks,
            episodes_per_task=episodes_per_task or self.episodes_per_task,
            horizon=self.horizon,
            generator=generator,
            sampling=self.sampling,
            pooled=pooled,
        )
        return with_advantages(episodes, discount=self.discount, normalize=self.normalize)

    def adapt(
        self, params: Params, inner: Iterable[Episodes], lr: float, create_graph: bool
    ) -> Params:
        for episodes in inner:
            params = inner_update(
                lambda p, e=episodes: pg_loss(self.policy, p, e), params, lr, create_graph
            )
        return params

    def meta_objective(self, tasks: Tensor, generator: torch.Generator) -> tuple[Objective, Tensor]:
        """Sample one meta-iteration's episodes; return the outer objective, [post, pre] returns.

        ``objective(differentiable)`` gives the post-update surrogate loss and the mean KL from
        the sampling policy π_old, at the current θ (see ``TRPO.step``).
        """
        num_tasks = tasks.shape[0]
        # sample with θ, step, sample with θ'ᵢ, ...: the episodes of the inner steps, then post
        sampled = self.adaptation(
            self.params,
            tasks,
            steps=self.inner_steps,
            lr=self.inner_lr,
            later_lr_scale=1.0,
            generator=generator,
            pooled=True,
        )
        *inner, post = sampled.episodes
        post = post.packed()  # the surrogate and KL read only live steps
        fast = sampled.params
        with torch.no_grad():  # π_old: copies, since TRPO moves θ (and θ'ᵢ = θ without inner steps)
            old = {n: p.clone() for n, p in fast.items()}
            old_mean, old_log_std = self.policy.distribution(old, post.flat_obs())
            old_logp = log_prob(old_mean, old_log_std, post.flat_actions()).view_as(post.mask)

        def objective(differentiable: bool) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                start = (
                    self.params
                    if differentiable
                    else {n: p.detach().requires_grad_() for n, p in self.params.items()}
                )
                adapted = self.adapt(
                    per_task(start, num_tasks),
                    inner,
                    self.inner_lr,
                    create_graph=differentiable and not self.first_order,
                )
                if not differentiable:
                    adapted = {n: p.detach() for n, p in adapted.items()}
            mean, log_std = self.policy.distribution(adapted, post.flat_obs())
            logp = log_prob(mean, log_std, post.flat_actions()).view_as(post.mask)
            ratio = torch.exp(logp - old_logp)
            loss = -_masked_task_mean(ratio * post.advantages, post.mask).mean()
            kl = kl_divergence(old_mean, old_log_std, mean, log_std).view_as(post.mask)
            return loss, _masked_task_mean(kl, post.mask).mean()

        return objective, torch.stack([sampled.returns[-1].mean(), sampled.returns[0].mean()])

    def adaptation(
        self,
        params: Params,
        tasks: Tensor,
        *,
        steps: int,
        lr: float,
        later_lr_scale: float,
        generator: torch.Generator,
        episodes_per_task: int | None = None,
        pooled: bool = False,
    ) -> AdaptationResult:
        """Sample, take a policy-gradient step, sample again, ... ``steps`` times from θ.

        The paper's test (returns after 0..steps steps) and the sampling half of a
        meta-iteration. The steps after the first use α·``later_lr_scale`` (the reference
        code's tests: 0.5; the ant's direction: 0.01). ``episodes_per_task``: K at meta-test
        (``task.eval_k_shot``). ``pooled``: the tasks are a meta-training batch (``sample``).
        """
        fast = per_task({n: p.detach() for n, p in params.items()}, tasks.shape[0])
        returns, sampled = [], []
        for s in range(steps + 1):
            episodes = self.sample(fast, tasks, generator, episodes_per_task, pooled)
            returns.append(episodes.mean_return())
            sampled.append(episodes)
            if s < steps:
                step_lr = lr * later_lr_scale if s > 0 else lr
                with torch.enable_grad():
                    fast = {n: p.requires_grad_() for n, p in fast.items()}
                    fast = self.adapt(fast, [episodes], step_lr, create_graph=False)
                fast = {n: p.detach() for n, p in fast.items()}
        return AdaptationResult(torch.stack(returns), sampled, fast)


class RLTaskStream:
    """Meta-training tasks of an RL run: ``batch(step)`` is the same for the same seed and step.

    Returns the step's tasks and the generator they were drawn from; the meta-iteration's
    episodes are sampled from that generator next, so a resumed run sees exactly the tasks and
    episodes an uninterrupted one would.
    """

    def __init__(self, env: VectorEnv, *, meta_batch_size: int, seed: int) -> None:
        positive_int("meta_batch_size", meta_batch_size)
        self.env, self.meta_batch_size, self.seed = env, meta_batch_size, seed

    def batch(self, step: int) -> tuple[Tensor, torch.Generator]:
        generator = make_generator(stream_seed(self.seed, step), torch.device("cpu"))
        return self.env.sample_tasks(self.meta_batch_size, generator), generator


# What ``trpo_step``'s update returns, in order (the trainer logs their means under these keys).
METRICS = (
    "meta_train/return_post",
    "meta_train/return_pre",
    "meta_train/kl",
    "meta_train/backtracks",
    # surrogate loss before − after the accepted step (0 when the line search gave up)
    "meta_train/surrogate_improvement",
)


def trpo_step(learner: MetaRL, optimizer: TRPO, stream: RLTaskStream) -> Callable[[int], Tensor]:
    """One MAML-TRPO meta-iteration as ``update(step)``; returns the figures named by METRICS."""

    def update(step: int) -> Tensor:
        objective, returns = learner.meta_objective(*stream.batch(step))
        stats = optimizer.step(objective)
        improvement = stats["surrogate_before"] - stats["surrogate"]
        health = [stats["kl"], stats["backtracks"], improvement]
        return torch.cat([returns, returns.new_tensor(health)])

    return update


# What ``outer_optimizer_step``'s update returns: METRICS without the line search's backtracks.
OPTIMIZER_METRICS = tuple(m for m in METRICS if m != "meta_train/backtracks")


def outer_optimizer_step(
    learner: MetaRL, optimizer: torch.optim.Optimizer, stream: RLTaskStream
) -> Callable[[int], Tensor]:
    """One meta-iteration with a ``torch.optim`` outer optimiser as ``update(step)``: one
    full-batch step on the post-update surrogate (its gradient at θ_old is the policy gradient
    through the inner steps); returns the figures named by OPTIMIZER_METRICS, the step's KL
    and surrogate improvement measured on the same samples after it.

    Without inner steps (``algorithm=pretrain``) this is the reference code's pretraining path
    (``MAMLNPO(use_maml=False)``: one full-batch Adam step, lr 1e-3, per iteration on the
    tasks' mean −log π·Â).
    """

    def update(step: int) -> Tensor:
        objective, returns = learner.meta_objective(*stream.batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            after, kl = objective(False)
        return torch.cat([returns, torch.stack([kl, loss.detach() - after])])

    return update
