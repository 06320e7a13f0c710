"""Datasets: archive checks and downloads, Omniglot and miniImageNet loaders."""

from maml_runner.data.miniimagenet import load_miniimagenet
from maml_runner.data.omniglot import (
    OmniglotData,
    background_split,
    load_omniglot,
    paper_split,
)

__all__ = ["OmniglotData", "load_miniimagenet", "background_split", "load_omniglot", "paper_split"]
