"""Datasets: archive checks and downloads (``archives``), Omniglot (``omniglot``)."""

from maml_runner.data.omniglot import (
    OmniglotData,
    background_split,
    load_omniglot,
    paper_split,
    with_rotations,
)

__all__ = ["OmniglotData", "background_split", "load_omniglot", "paper_split", "with_rotations"]
