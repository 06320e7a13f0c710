"""A batch of tasks: every family samples one, every algorithm consumes one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TaskBatch:
    """T tasks' support and query sets, each ``[T, N, ...]``; ``info`` holds task parameters."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    info: dict[str, Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def tasks(self, lo: int, hi: int) -> TaskBatch:
        """Tasks ``lo..hi-1`` (views, no copy)."""
        info = None if self.info is None else {k: v[lo:hi] for k, v in self.info.items()}
        return TaskBatch(
            self.support_x[lo:hi],
            self.support_y[lo:hi],
            self.query_x[lo:hi],
            self.query_y[lo:hi],
            info,
        )
