"""Task families: each turns a random generator into a batch of tasks ``[T, N, ...]``."""

from maml_runner.tasks.base import FixedTasks, TaskStream
from maml_runner.tasks.sinusoid import Sinusoid

__all__ = ["FixedTasks", "Sinusoid", "TaskStream"]
