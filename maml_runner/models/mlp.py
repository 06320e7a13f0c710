"""Fully connected network: the paper's sinusoid regressor (1-40-40-1, ReLU) and its no-conv
Omniglot baseline (784-256-128-64-64-N with batch norm)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from maml_runner.errors import choose, positive_int, require

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
INITS = ("torch", "paper", "xavier")


class MLP(nn.Sequential):
    """``in_features → hidden… → out_features`` with an activation between linear layers.

    Args:
        in_features: input size.
        out_features: output size.
        hidden: sizes of the hidden layers, e.g. ``[40, 40]``.
        activation: one of ``relu``, ``tanh``, ``elu``.
        init: ``torch`` (PyTorch's default) or ``paper`` (weights from a normal with σ=0.01
            truncated at 2σ, biases zero: the reference code's initialisation) or ``xavier``
            (Glorot-uniform weights, biases zero: the RL reference code's policy, cbfinn/maml_rl
            ``maml_minimal_gauss_mlp_policy.py``; Glorot & Bengio 2010).
        batch_norm: batch norm (per-task batch statistics) after every hidden linear layer.
        flatten: flatten image inputs ``[..., C, H, W]`` first (``in_features = C*H*W``).

    Raises:
        InvalidArgument: a size that is not an integer >= 1, an unknown ``activation`` or
            ``init``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
        init: str = "torch",
        batch_norm: bool = False,
        flatten: bool = False,
    ) -> None:
        positive_int("in_features", in_features)
        positive_int("out_features", out_features)
        ok = all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
        require(ok, "hidden", list(hidden), "layer sizes must be integers >= 1")
        choose("activation", activation, ACTIVATIONS)
        choose("init", init, INITS)
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = [nn.Flatten()] if flatten else []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(sizes) - 2:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(fan_out, track_running_stats=False))
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        if init == "paper":
            for layer in self:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(layer.bias)
        elif init == "xavier":
            for layer in self:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
