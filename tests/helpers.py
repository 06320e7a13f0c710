"""Test helpers: compose configs like a run does, and call the installed ``maml-run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import maml_runner.config  # noqa: F401  (registers the schemas)
from maml_runner.paths import conf_dir

REPO = Path(__file__).resolve().parents[1]
# The full Omniglot set, beside the checkout (see ../shared/data/omniglot/README.md).
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
# Decoded-tensor cache shared by test sessions (decoding takes ~7 s once).
CACHE = Path(tempfile.gettempdir()) / "maml-runner-test-cache"
DATA = [f"data.root={OMNIGLOT}", f"data.cache_dir={CACHE}"]

# Small, fast settings for end-to-end runs.
QUICK = [
    "trainer.steps=40",
    "trainer.val_every=20",
    "trainer.val_tasks=10",
    "trainer.checkpoint_every=20",
    "trainer.log_every=10",
    "trainer.progress=false",
    "eval.num_tasks=20",
    "eval.batch_size=20",
    "logger.mode=disabled",
    "device=cpu",
]


def make_config(overrides: list[str]) -> DictConfig:
    """Compose like a run does; datasets come from the shared copy, cached in a temp folder."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=[*DATA, *overrides])


def maml_run_command() -> list[str]:
    exe = shutil.which("maml-run")
    return [exe] if exe else [sys.executable, "-m", "maml_runner"]


def maml_run(
    args: list[str], cwd: Path, check: bool = True, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess from ``cwd`` (not the repository)."""
    full_env = {**os.environ, "WANDB_MODE": "", **(env or {})}
    full_env.pop("WANDB_MODE")
    proc = subprocess.run(
        [*maml_run_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"maml-run {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
