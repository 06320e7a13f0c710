"""maml-runner: a config-driven experiment runner for Model-Agnostic Meta-Learning."""

__version__ = "0.1.0"
