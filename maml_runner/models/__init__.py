"""Plain ``nn.Module`` models; they know nothing of MAML."""

from maml_runner.models.mlp import MLP

__all__ = ["MLP"]
