"""Rollouts of a meta-batch, returns, the linear feature baseline and advantages.

Episodes of T tasks × M trajectories run in lock-step, so each time step is one batched policy
forward for every task (``GaussianPolicy.distribution`` with per-task weights) and one
environment step for all T·M episodes. Tensors are ``[T, M, H, ...]``; ``mask`` is 1 while an
episode is alive (an ended episode's later steps are padding).

Three ways to sample a task (``sampling``): ``episodes``, exactly M trajectories; ``steps``,
whole trajectories until M·H time steps are collected (the reference code's ``batch_size``
counts ``fast_batch_size·max_path_length`` time steps, so episodes that end early at a goal
make room for more of them); ``rllab``, the trajectories rllab's ``VectorizedSampler`` keeps, as
the reference code ran it. That sampler steps its environments together, each starting a new
trajectory when one ends, and stops at the first time step at which its *finished*
trajectories hold the budget; the ones still running are dropped. So where trajectories end
early, those that end soonest are over-represented: the reference's figures average over that
sample. Its meta-training batch ran one environment per task with one budget, T·M·H, for the
whole batch (``pooled``); its tests ran each task alone with M environments and M·H steps.
Either way ``Episodes`` holds the task's trajectories; unused slots have a ``mask`` of 0
throughout and count in no mean.

References:
    Duan et al. (2016), Benchmarking Deep RL for Continuous Control (rllab): the linear feature
    baseline that the MAML reference code refits per task, and its batch sampler;
    cbfinn/maml_rl, ``sandbox/rocky/tf/samplers/vectorized_sampler.py`` (the ``VectorizedSampler``
    its ``BatchMAMLPolopt`` builds with one environment per task, and its ``BatchPolopt`` tests
    with ``batch_size / max_path_length`` environments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from maml_runner.maml.functional import Params
from maml_runner.models.policy import GaussianPolicy
from maml_runner.rl.envs import VectorEnv

# episodes: exactly M trajectories per task; steps: whole trajectories until M·H time steps;
# rllab: the finished trajectories of environments stepped together until they hold the budget
SAMPLINGS = ("episodes", "steps", "rllab")


@dataclass
class Episodes:
    obs: Tensor  # [T, M, H, obs_dim]
    actions: Tensor  # [T, M, H, act_dim] (as sampled, before the environment clips them)
    rewards: Tensor  # [T, M, H] (0 after an episode ends)
    mask: Tensor  # [T, M, H]
    advantages: Tensor | None = None  # [T, M, H], set by ``with_advantages``
    _packed: Episodes | None = field(default=None, repr=False)

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of every trajectory slot, ``[T, M]`` (0 for an unused slot)."""
        return self.rewards.sum(-1)

    @property
    def valid(self) -> Tensor:
        """1 for a slot that holds a trajectory, 0 for an unused one, ``[T, M]``."""
        return self.mask[..., 0]

    def mean_return(self) -> Tensor:
        """Mean undiscounted return over each task's trajectories, ``[T]`` (the paper's figure)."""
        return (self.returns * self.valid).sum(1) / self.valid.sum(1).clamp_min(1)

    def packed(self) -> Episodes:
        """The live steps of each task moved to the front, as ``[T, 1, L, ...]`` (L: the most any
        task has): the same masked means at a fraction of the cost when episodes end early.
        Holds obs, actions, mask and advantages (what the losses read); cached."""
        if self._packed is None:
            t, m, h = self.mask.shape
            flat_mask = self.mask.reshape(t, m * h)
            length = max(int(flat_mask.sum(1).max().item()), 1)
            order = torch.sort(flat_mask, dim=1, descending=True, stable=True).indices[:, :length]

            def take(x: Tensor) -> Tensor:
                flat = x.reshape(t, m * h, *x.shape[3:])
                index = order.view(t, length, *[1] * (flat.dim() - 2)).expand(
                    t, length, *flat.shape[2:]
                )
                return flat.gather(1, index).unsqueeze(1)

            adv = None if self.advantages is None else take(self.advantages)
            mask = take(self.mask)
            self._packed = Episodes(take(self.obs), take(self.actions), mask * 0, mask, adv)
        return self._packed

    def flat_obs(self) -> Tensor:
        t, m, h = self.mask.shape
        return self.obs.reshape(t, m * h, -1)

    def flat_actions(self) -> Tensor:
        t, m, h = self.mask.shape
        return self.actions.reshape(t, m * h, -1)


def _run(
    env: VectorEnv,
    policy: GaussianPolicy,
    params: Params,
    tasks: Tensor,
    m: int,
    horizon: int,
    generator: torch.Generator,
) -> Episodes:
    """One wave: ``m`` episodes of each task in lock-step, each until done or ``horizon``."""
    t = tasks.shape[0]
    device = next(iter(params.values())).device
    obs = env.reset(tasks.repeat_interleave(m, 0), generator).to(device)
    alive = torch.ones(t * m, device=device)
    observations, actions, rewards, masks = [], [], [], []
    for _ in range(horizon):
        mean, log_std = policy.distribution(params, obs.view(t, m, -1))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        action = (mean + torch.exp(log_std) * noise.to(device)).view(t * m, -1)
        next_obs, reward, done = env.step(action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward.to(device) * alive)
        masks.append(alive)
        alive = alive * (~done.to(device)).float()
        obs = next_obs.to(device)
        if not alive.any():
            break

    def stack(xs: list[Tensor]) -> Tensor:
        out = torch.stack(xs, dim=1)  # [T*M, H', ...]
        pad = horizon - out.shape[1]
        if pad:
            out = torch.cat([out, out.new_zeros(out.shape[0], pad, *out.shape[2:])], dim=1)
        return out.view(t, m, horizon, *out.shape[2:])

    return Episodes(stack(observations), stack(actions), stack(rewards), stack(masks))


def _kept(waves: list[Episodes], keep: Tensor) -> Episodes:
    """The trajectories of ``waves`` (concatenated wave by wave) where ``keep`` ``[T, W·M]`` is 1,
    moved to the front of each task's slots, the slots trimmed to the most any task keeps."""
    obs, actions, rewards, mask = (
        torch.cat([getattr(w, name) for w in waves], dim=1)
        for name in ("obs", "actions", "rewards", "mask")
    )
    keep = keep.to(mask.device, mask.dtype)
    order = torch.sort(keep, dim=1, descending=True, stable=True).indices
    slots = max(int(keep.sum(1).max().item()), 1)
    order = order[:, :slots]
    kept = keep.gather(1, order)

    def take(x: Tensor) -> Tensor:
        index = order.view(*order.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
        out = x.gather(1, index)
        return out * kept.view(*kept.shape, *[1] * (x.dim() - 2))

    return Episodes(take(obs), take(actions), take(rewards), take(mask))


def _lengths(waves: list[Episodes]) -> Tensor:
    """Time steps of every trajectory of ``waves``, concatenated wave by wave, ``[T, W·M]``."""
    return torch.cat([w.mask.sum(-1) for w in waves], dim=1).cpu()


def _first_until(waves: list[Episodes], budget: int) -> Episodes:
    """Each task's first trajectories (wave by wave) until their steps reach ``budget``."""
    lengths = _lengths(waves)
    before = lengths.cumsum(1) - lengths  # steps collected before each trajectory
    return _kept(waves, (before < budget).float())


def _vectorized_stop(ends: Tensor, lengths: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """The first time step at which the trajectories finished by then hold ``budget`` steps, per
    row of ``ends``/``lengths`` ``[P, N]``, and whether the row's trajectories reach it."""
    order = ends.argsort(dim=1, stable=True)
    held = lengths.gather(1, order).cumsum(1) >= budget
    first = held.float().argmax(1, keepdim=True)  # first finished trajectory that fills it
    return ends.gather(1, order).gather(1, first).squeeze(1), held.any(1)


def _vectorized(waves: list[Episodes], m: int, horizon: int, pooled: bool) -> Episodes | None:
    """rllab's ``VectorizedSampler`` over the trajectories of ``waves``, or None when they are too
    few to tell where it stops.

    A task's trajectories run in its environments (``pooled``: one; else ``m``) one after the
    other, trajectory j in environment j mod count, so each ends at the sum of the lengths
    before it there. The sampler stops at the first time step where the finished trajectories
    of the pool (``pooled``: the whole batch; else the task) hold the budget, and keeps those
    finished by then. That time is known once every environment of the pool has run past it.
    """
    t = waves[0].mask.shape[0]
    envs, pools = (1, 1) if pooled else (m, t)
    lengths = _lengths(waves)
    ends = lengths.view(t, -1, envs).cumsum(1)  # [T, trajectories per env, envs]
    ran = ends[:, -1, :].reshape(pools, -1)  # time each environment of a pool has run
    ends = ends.view(t, -1)
    budget = m * horizon * (t // pools)
    stop, reached = _vectorized_stop(ends.view(pools, -1), lengths.view(pools, -1), budget)
    if not bool((reached & (ran.min(1).values >= stop)).all()):
        return None
    stop = stop.repeat_interleave(t // pools)  # each task's pool's
    return _kept(waves, (ends <= stop.unsqueeze(1)).float())


@torch.no_grad()
def rollout(
    env: VectorEnv,
    policy: GaussianPolicy,
    params: Params,
    tasks: Tensor,
    *,
    episodes_per_task: int,
    horizon: int,
    generator: torch.Generator,
    sampling: str = "episodes",
    pooled: bool = False,
) -> Episodes:
    """Episodes of each task t with its weights ``params[..][t]``: ``episodes_per_task`` (M) of
    them (``sampling=episodes``), whole ones until M·``horizon`` time steps (``steps``), or
    those rllab's ``VectorizedSampler`` keeps (``rllab``; ``pooled``: a meta-training batch,
    one environment per task and one budget for all, else each task with M environments).
    Waves of M run in lock-step until the sampling has what it needs."""
    if sampling == "episodes":
        return _run(env, policy, params, tasks, episodes_per_task, horizon, generator)
    waves: list[Episodes] = []
    while True:
        waves.append(_run(env, policy, params, tasks, episodes_per_task, horizon, generator))
        if sampling == "rllab":
            episodes = _vectorized(waves, episodes_per_task, horizon, pooled)
            if episodes is not None:
                return episodes
        elif bool((_lengths(waves).sum(1) >= episodes_per_task * horizon).all()):
            return _first_until(waves, episodes_per_task * horizon)


def discounted_returns(rewards: Tensor, discount: float) -> Tensor:
    """Reward-to-go ``Σ_{k≥h} γ^{k-h} r_k`` at every step, ``[T, M, H]``."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for h in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., h] + discount * running
        out[..., h] = running
    return out


def baseline_features(episodes: Episodes) -> Tensor:
    """rllab's baseline features obs, obs², t, t², t³, 1 (t = step/100), ``[T, M, H, F]``."""
    obs = episodes.obs.clamp(-10, 10)
    t, m, h = episodes.mask.shape
    time = (torch.arange(h, device=obs.device, dtype=obs.dtype) / 100).view(1, 1, h, 1)
    time = time.expand(t, m, h, 1)
    ones = torch.ones_like(time)
    return torch.cat([obs, obs.square(), time, time.square(), time**3, ones], dim=-1)


def linear_baseline(episodes: Episodes, returns: Tensor, reg: float = 1e-5) -> Tensor:
    """Value estimates from a ridge regression of returns on features, fitted per task."""
    feats = baseline_features(episodes).double() * episodes.mask.double().unsqueeze(-1)
    t = feats.shape[0]
    x = feats.reshape(t, -1, feats.shape[-1])
    y = (returns.double() * episodes.mask.double()).reshape(t, -1, 1)
    gram, rhs = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(5):  # as rllab: raise the ridge until the solve is finite
        weights = torch.linalg.solve(gram + reg * eye, rhs)
        if torch.isfinite(weights).all():
            break
        reg *= 10
    return (feats @ weights.unsqueeze(1)).squeeze(-1).to(returns.dtype)


def with_advantages(episodes: Episodes, *, discount: float, normalize: bool) -> Episodes:
    """Set ``advantages = returns-to-go − linear baseline`` (optionally standardised per task)."""
    returns = discounted_returns(episodes.rewards, discount)
    adv = (returns - linear_baseline(episodes, returns)) * episodes.mask
    if normalize:
        count = episodes.mask.sum((1, 2), keepdim=True).clamp_min(1)
        mean = adv.sum((1, 2), keepdim=True) / count
        var = ((adv - mean).square() * episodes.mask).sum((1, 2), keepdim=True) / count
        adv = (adv - mean) / (var.sqrt() + 1e-8) * episodes.mask
    episodes.advantages = adv
    episodes._packed = None
    return episodes
