"""torchrun: two gloo processes give the meta-parameters of one, and resume under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maml_runner.distributed import share
from maml_runner.errors import UserError
from tests.helpers import QUICK, maml_run


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m maml_runner ARGS`` (as the README says)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "-m", "maml_runner", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_share_splits_a_meta_batch_contiguously() -> None:
    assert [share(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [share(4, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(UserError, match="--nproc_per_node <= 2"):
        share(2, 0, 3)


def test_two_gloo_ranks_match_one_process_and_resume(tmp_path: Path) -> None:
    # A meta-batch of 5 tasks over 2 ranks (3 + 2): the weighting must make it exact anyway.
    common = ["task=sinusoid", "seed=3", "trainer.meta_batch_size=5", *QUICK]
    one, two = tmp_path / "one", tmp_path / "two"
    maml_run([*common, f"hydra.run.dir={one}"], cwd=tmp_path)
    # 20 of the 40 steps under torchrun, W&B offline; then resume to 40 under torchrun.
    first = [o if o != "trainer.steps=40" else "trainer.steps=20" for o in common]
    first = [o for o in first if not o.startswith("logger.")] + ["logger.mode=offline"]
    torchrun([*first, f"hydra.run.dir={two}"], cwd=tmp_path)
    proc = torchrun([f"resume={two}", "trainer.steps=40"], cwd=tmp_path)
    assert proc.stdout.count("resuming from") == 1, "only rank 0 prints"

    a, b = weights(one), weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    # Rank 0 alone wrote the history (each logged step once), metrics and the W&B run.
    history = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in history if "meta_train/query_loss" in r]
    assert steps == [10, 20, 30, 40]
    sessions = sorted((two / "wandb").glob("offline-run-*"))  # one per launch, one run id
    assert len(sessions) == 2 and len({p.name.rsplit("-", 1)[1] for p in sessions}) == 1
    assert json.loads((two / "metrics.json").read_text())["train"]["steps"] == 40
    assert not (tmp_path / "outputs").exists(), "every rank wrote into hydra.run.dir"
