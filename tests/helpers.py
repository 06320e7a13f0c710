"""Test helpers: compose configs like a run does, and call the installed ``maml-run``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import maml_runner.config  # noqa: F401  (registers the schemas)
from maml_runner.data.omniglot import ARCHIVES
from maml_runner.paths import conf_dir

REPO = Path(__file__).resolve().parents[1]
# The full Omniglot set, beside the checkout (see ../shared/data/omniglot/README.md). A checkout
# without it still runs every other test: the cases that read it skip (needs_omniglot).
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
HAS_OMNIGLOT = all((OMNIGLOT / name).is_file() for name in ARCHIVES)
NO_OMNIGLOT = f"the Omniglot zips are not in {OMNIGLOT} (see the project's data README)"
needs_omniglot = pytest.mark.skipif(not HAS_OMNIGLOT, reason=NO_OMNIGLOT)
# Data folder of the tests (data.cache_dir), one per checkout (keyed by its path, so checkouts
# side by side never re-point each other's links): omniglot/ links to the shared copy,
# miniimagenet/ is a small generated stand-in (no copy exists on these machines); decoded
# tensors are cached here across test sessions (Omniglot decodes in ~7 s once).
_CHECKOUT = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
CACHE = Path(tempfile.gettempdir()) / f"maml-runner-test-data-{_CHECKOUT}"
DATA = [f"data.cache_dir={CACHE}"]


def skip_without_omniglot(cfg: DictConfig) -> None:
    """Skip the calling test if ``cfg`` reads Omniglot from CACHE and the shared copy is absent."""
    if cfg.task.name == "omniglot" and cfg.data.root is None and not HAS_OMNIGLOT:
        pytest.skip(f"{cfg.task.name} task: {NO_OMNIGLOT}")


def _prepare_data() -> None:
    """Lay out CACHE: the Omniglot link and a miniImageNet pickle fixture big enough for the
    presets (6 classes per split, 20 images each: 5-way tasks with K + 15 <= 20)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    link = CACHE / "omniglot"
    if HAS_OMNIGLOT and not link.is_symlink():
        link.symlink_to(OMNIGLOT)
    mini = CACHE / "miniimagenet"
    if (mini / "mini-imagenet-cache-test.pkl").exists():
        return
    mini.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for number, split in enumerate(("train", "val", "test")):
        classes, per_class = 6, 20
        data = {
            "image_data": rng.integers(0, 256, (classes * per_class, 84, 84, 3), dtype=np.uint8),
            "class_dict": {
                f"n{number}{c:07d}": list(range(c * per_class, (c + 1) * per_class))
                for c in range(classes)
            },
        }
        tmp = mini / f"mini-imagenet-cache-{split}.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, mini / f"mini-imagenet-cache-{split}.pkl")


_prepare_data()

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
