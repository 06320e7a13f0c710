"""Plain ``nn.Module`` models; they know nothing of MAML."""

from maml_runner.models.conv import Conv4
from maml_runner.models.mlp import MLP
from maml_runner.models.policy import GaussianPolicy
from maml_runner.models.resnet import ResNet12

__all__ = ["MLP", "Conv4", "GaussianPolicy", "ResNet12"]
