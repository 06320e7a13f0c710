"""Sinusoid regression (paper §5.1): y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5].

References:
    Finn, Abbeel & Levine (2017), §5.1 "Regression".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from maml_runner.errors import require
from maml_runner.tasks.base import TaskPlot
from maml_runner.tasks.batch import TaskBatch
from maml_runner.tasks.losses import TaskLoss, regression_loss


@dataclass(frozen=True)
class Sinusoid:
    """The sinusoid task family; ranges default to the paper's.

    Raises:
        InvalidArgument: an empty or reversed range (``0 <= amplitude_min <= amplitude_max``,
            ``phase_min <= phase_max``, ``x_min < x_max``).
    """

    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0

    input_shape: tuple[int, ...] = (1,)
    output_size: int = 1
    small: bool = True  # a task is 2 numbers and a few points

    @property
    def task_loss(self) -> TaskLoss:
        return regression_loss()

    @property
    def task_plot(self) -> TaskPlot:
        """The true sine of each task on 200 points of [x_min, x_max] (paper Fig. 2 style)."""
        return TaskPlot(torch.linspace(self.x_min, self.x_max, 200).view(-1, 1), self.curve)

    def __post_init__(self) -> None:
        require(self.amplitude_min >= 0, "amplitude_min", self.amplitude_min, "must be >= 0")
        require(
            self.amplitude_max >= self.amplitude_min,
            "amplitude_max",
            self.amplitude_max,
            f"must be >= amplitude_min ({self.amplitude_min})",
        )
        require(
            self.phase_max >= self.phase_min,
            "phase_max",
            self.phase_max,
            f"must be >= phase_min ({self.phase_min})",
        )
        require(self.x_max > self.x_min, "x_max", self.x_max, f"must be > x_min ({self.x_min})")

    def sample(
        self, num_tasks: int, generator: torch.Generator, *, k_shot: int, query_size: int
    ) -> TaskBatch:
        """Draw tasks with ``k_shot`` support and ``query_size`` query points, ``[T, N, 1]``."""
        device = generator.device
        u = torch.rand(num_tasks, 2, generator=generator, device=device)
        amplitude = self.amplitude_min + (self.amplitude_max - self.amplitude_min) * u[:, 0]
        phase = self.phase_min + (self.phase_max - self.phase_min) * u[:, 1]
        n = k_shot + query_size
        x = self.x_min + (self.x_max - self.x_min) * torch.rand(
            num_tasks, n, 1, generator=generator, device=device
        )
        y = amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))
        return TaskBatch(
            x[:, :k_shot],
            y[:, :k_shot],
            x[:, k_shot:],
            y[:, k_shot:],
            {"amplitude": amplitude, "phase": phase},
        )

    def curve(self, info: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The true function of each task at points ``x`` ``[T, N, 1]`` (for plots)."""
        return info["amplitude"].view(-1, 1, 1) * torch.sin(x - info["phase"].view(-1, 1, 1))
