"""The README's worked example (Your own model): ``examples/myproject/nets.py``, a residual conv
net of a user's own, meta-trained on Omniglot 5-way 1-shot by ``model=custom``, end to end."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.helpers import DATA, REPO, maml_run, needs_omniglot, read_metrics

EXAMPLES = REPO / "examples"


@needs_omniglot
def test_the_readme_example_meta_trains_the_users_residual_conv_net(tmp_path: Path) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(REPO), os.environ.get("PYTHONPATH", "")])
    }
    run_dir = tmp_path / "run"
    done = maml_run(
        [
            "experiment=finn17_omniglot_5w1s_short",
            "model=custom",
            "model._target_=myproject.nets.ResConvNet",
            "model.channels=8",
            "trainer.steps=2",
            "trainer.val_every=2",
            "trainer.val_tasks=2",
            "trainer.meta_batch_size=2",
            "eval.num_tasks=2",
            "eval.batch_size=2",
            "logger.mode=disabled",
            "trainer.progress=false",
            "device=cpu",
            *DATA,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        timeout=900,  # data, imports and a meta-test: a minute on an idle CPU, more when shared
    )
    assert "model ResConvNet: torch.func path, because ResConvNet" in done.stdout
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    shapes = {n: tuple(p.shape) for n, p in state["model"].items()}
    assert shapes["stem.weight"] == (8, 1, 3, 3)  # input_shape [1, 28, 28] from the task
    assert shapes["blocks.1.norm2.weight"] == (8,) and shapes["head.weight"] == (5, 8)
    assert state["config"]["model"]["_target_"] == "myproject.nets.ResConvNet"
    metrics = read_metrics(run_dir)
    assert metrics["task"] == "omniglot" and "query_acc" in metrics["meta_test"]
