"""Experiment tracking: a JSONL history always, and one Weights & Biases run per job.

The only module that imports ``wandb``. ``mode=offline`` (the default) needs no account and no
network; ``wandb sync <run folder>/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

HISTORY = "metrics.jsonl"


class Tracker:
    """Log scalars, images and a summary for one job.

    Args:
        run_dir: the job's output folder; the history and the W&B files go there.
        mode: ``online`` | ``offline`` | ``disabled`` (W&B only; the JSONL is always written).
        config: the resolved config, logged to W&B.
        run_id: reuse a W&B run id (resuming a job continues its W&B run).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        mode: str,
        project: str,
        config: dict[str, Any],
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._history = open(self.run_dir / HISTORY, "a", buffering=1)
        self._run = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                tags=tags or None,
                name=name,
                config=config,
                dir=str(self.run_dir),
                mode=mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", quiet=True),
            )

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

    @property
    def wandb_dir(self) -> str | None:
        return None if self._run is None else str(Path(self._run.dir).parent)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars at ``step`` (keys ``split/quantity``)."""
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _json_number(v) for k, v in metrics.items()})
        self._history.write(json.dumps(row) + "\n")
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self._run is not None:
            import wandb

            self._run.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; always called (``finally``), also when the job fails."""
        self._history.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


class NullTracker:
    """Records nothing: torchrun's ranks other than 0 (rank 0 keeps the history and W&B run)."""

    run_id = None
    wandb_dir = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)
