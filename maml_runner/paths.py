"""Where the Hydra configs live: inside the installed package, or ``conf/`` beside it."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """``maml_runner/conf`` in a built wheel; the repository's ``conf/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"maml-runner's conf/ folder is missing (looked beside {here})")
