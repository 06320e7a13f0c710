"""Gaussian MLP policy: the paper's RL policy (two hidden layers of 100 ReLU units, §5.3).

The mean is an ``MLP`` of the observation; the log standard deviation is a learned vector,
independent of the state, as in rllab's ``GaussianMLPPolicy`` that the reference code used. Both
are ordinary parameters, so the inner policy-gradient step adapts them like any other weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maml_runner.errors import require
from maml_runner.maml.functional import Params, batched_forward
from maml_runner.models.mlp import MLP


class GaussianPolicy(nn.Module):
    """``π(a|s) = N(mean(s), diag(exp(log_std))²)``.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden layer sizes of the mean network (paper: ``[100, 100]``).
        activation: one of ``relu``, ``tanh``, ``elu``.
        init_std: initial standard deviation of every action dimension.
        init: the mean network's initialisation, an ``MLP`` init: ``torch`` or ``xavier``
            (Glorot-uniform weights, zero biases: the reference code's policy).

    Raises:
        InvalidArgument: ``init_std`` not > 0; a bad size, ``activation`` or ``init`` (from
            ``MLP``).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        init_std: float = 1.0,
        init: str = "torch",
    ) -> None:
        require(init_std > 0, "init_std", init_std, "the initial standard deviation must be > 0")
        super().__init__()
        self.mean = MLP(obs_dim, act_dim, hidden=hidden, activation=activation, init=init)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def distribution(self, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task ``(mean, log_std)`` for ``obs`` ``[T, N, obs_dim]`` with weights ``[T, ...]``.

        ``log_std`` comes back broadcastable to the mean: ``[T, 1, act_dim]``.
        """
        mean_params = {n[len("mean.") :]: p for n, p in params.items() if n.startswith("mean.")}
        mean = batched_forward(self.mean, mean_params, obs)
        log_std = params["log_std"].view(obs.shape[0], *[1] * (mean.dim() - 2), -1)
        return mean, log_std


def log_prob(mean: Tensor, log_std: Tensor, action: Tensor) -> Tensor:
    """Log-density of a diagonal Gaussian, summed over the action dimension."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def kl_divergence(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """KL(π₀ ‖ π₁) of diagonal Gaussians, summed over the action dimension."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    kl = log_std1 - log_std0 + (var0 + (mean0 - mean1).square()) / (2 * var1) - 0.5
    return kl.sum(-1)
