"""Plain ``nn.Module`` models; they know nothing of MAML."""

from maml_runner.models.conv import Conv4
from maml_runner.models.mlp import MLP

__all__ = ["MLP", "Conv4"]
