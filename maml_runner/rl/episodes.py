"""Rollouts of a meta-batch, returns, the linear feature baseline and advantages.

Episodes of T tasks × M trajectories run in lock-step, so each time step is one batched policy
forward for every task (``GaussianPolicy.distribution`` with per-task weights) and one
environment step for all T·M episodes. Tensors are ``[T, M, H, ...]``; ``mask`` is 1 while an
episode is alive (an ended episode's later steps are padding).

References:
    Duan et al. (2016), Benchmarking Deep RL for Continuous Control (rllab): the linear feature
    baseline that the MAML reference code refits per task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maml_runner.maml.functional import Params
from maml_runner.models.policy import GaussianPolicy
from maml_runner.rl.envs import VectorEnv


@dataclass
class Episodes:
    obs: Tensor  # [T, M, H, obs_dim]
    actions: Tensor  # [T, M, H, act_dim] (as sampled, before the environment clips them)
    rewards: Tensor  # [T, M, H] (0 after an episode ends)
    mask: Tensor  # [T, M, H]
    advantages: Tensor | None = None  # [T, M, H], set by ``with_advantages``

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of every trajectory, ``[T, M]`` (what the paper reports)."""
        return self.rewards.sum(-1)

    def flat_obs(self) -> Tensor:
        t, m, h = self.mask.shape
        return self.obs.reshape(t, m * h, -1)

    def flat_actions(self) -> Tensor:
        t, m, h = self.mask.shape
        return self.actions.reshape(t, m * h, -1)


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
) -> Episodes:
    """Run ``episodes_per_task`` episodes of each task t with its weights ``params[..][t]``."""
    t, m = tasks.shape[0], episodes_per_task
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
    return episodes
