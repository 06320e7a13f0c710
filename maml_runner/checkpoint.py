"""Checkpoints that resume a run exactly: weights, optimiser, step, best metric, RNG, config.

The meta-parameters are two state dicts: ``model`` (θ, under the model's own parameter names)
and ``learned`` (the learner's own meta-parameters beside θ, e.g. Meta-SGD's ``lr.<name>``, and
per-step batch-norm statistics ``bn_stats.<layer>.running_mean/var``; empty for MAML), so a
user's checkpoint shows the user's names under ``model`` whatever the algorithm.
``load_weights`` checks and loads both, for resume, best-checkpoint selection and ``maml-run
evaluate`` alike.

A checkpoint is one ``torch.save`` file, written atomically (temporary file, flushed to disk, then
renamed), read back with ``weights_only=True`` (no pickled code runs on load). A write that fails
(a full disk) leaves the previous checkpoint as it was and no temporary file.
"""

from __future__ import annotations

import errno
import io
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from maml_runner.errors import UserError

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"  # θ at the best validation step
TOP = "top"  # θ at the trainer.keep_best best validation steps: top/step<S>.pt


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None = None,
    step: int,
    config: dict,
    best: dict | None = None,
    extra: dict | None = None,
    learned: nn.Module | None = None,
) -> Path:
    """Write a complete, resumable checkpoint to ``path`` atomically.

    The state is serialised in memory first and then written with plain file I/O, so a failing
    write raises ``OSError`` with its errno (``torch.save`` straight to a full disk says only
    ``unexpected pos 64 vs 0``). The bytes go to ``<path>.tmp``, are flushed to disk and renamed
    onto ``path``; on any failure the temporary file is removed and ``path`` is untouched.

    Raises:
        UserError: the file cannot be written (``no space left on device while writing
            <path>; ...``); the previous ``path``, if any, is unchanged.
    """
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": model.state_dict(),
        "learned": {} if learned is None else learned.state_dict(),
        # TRPO (RL) keeps no state between steps: an empty dict
        "optimizer": {} if optimizer is None else optimizer.state_dict(),
        # the outer learning-rate schedule (outer.scheduler); {} without one
        "scheduler": {} if scheduler is None else scheduler.state_dict(),
        "best": best,
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from None
    except BaseException:  # Ctrl-C mid-write: nothing half-written stays behind
        _remove(tmp)
        raise
    return path


def _remove(tmp: Path) -> None:
    """Delete ``tmp`` if it is there; a failure to delete is not worth hiding the first error."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _write_error(path: Path, err: OSError) -> UserError:
    """The one-line ``UserError`` for a checkpoint that could not be written to ``path``."""
    reason = err.strerror or str(err) or type(err).__name__
    reason = reason[:1].lower() + reason[1:]  # "No space left on device" -> "no space left ..."
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = f"make {path.parent} writable"
    else:
        todo = "fix that"
    kept = f"the previous {path.name} is unchanged" if path.is_file() else "nothing was written"
    return UserError(f"{reason} while writing {path}; {kept}: {todo}")


def resolve(resume: str | os.PathLike) -> Path:
    """A run folder (→ its ``checkpoints/last.pt``) or a checkpoint file; must exist."""
    path = Path(resume).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / LAST
        if not candidate.is_file():
            raise UserError(f"resume={resume}: no checkpoints/{LAST} in that folder")
        return candidate
    if not path.is_file():
        raise UserError(f"resume={resume}: no such run folder or checkpoint file")
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a truncated or foreign file is a ``UserError`` naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"resume={path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"resume={path}: not a maml-runner checkpoint (format {FORMAT_VERSION})")
    return state


def check_model(model: nn.Module, state: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose parameters differ from ``model``'s in name or shape."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if ours == theirs:
        return
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise UserError(
                f"{where}: the checkpoint's model differs from the configured one at "
                f"{key}: checkpoint {theirs.get(key)}, config {ours.get(key)}; use the run's "
                f"own model settings"
            )


def load_weights(
    state: dict[str, Any], model: nn.Module, learned: nn.Module | None, where: str
) -> None:
    """Load θ (``state["model"]``) and the learner's own meta-parameters (``state["learned"]``)
    after checking both against the configured model and algorithm."""
    check_model(model, state, where)
    ours = {k: tuple(v.shape) for k, v in (learned or nn.Module()).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.get("learned", {}).items()}
    if ours != theirs:
        key = min(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if key.startswith("bn_stats."):  # per-step batch-norm statistics: a model setting
            raise UserError(
                f"{where}: the checkpoint's per-step batch-norm statistics differ from the "
                f"configured ones at {key}: checkpoint {theirs.get(key)}, config {ours.get(key)}; "
                f"use the run's own model.batch_norm_stats and inner.steps"
            )
        raise UserError(
            f"{where}: the checkpoint's learned meta-parameters differ from the configured "
            f"algorithm's at {key}: checkpoint {theirs.get(key)}, config {ours.get(key)}; use the "
            f"run's own algorithm settings"
        )
    model.load_state_dict(state["model"])
    if learned is not None:
        learned.load_state_dict(state.get("learned", {}))


@dataclass(frozen=True)
class Resumed:
    """Where a run starts: step 0, or what a checkpoint says."""

    step: int = 0
    train_time: float = 0.0
    best: dict | None = None
    run_id: str | None = None  # the W&B run to continue
    path: Path | None = None  # the checkpoint read (None: a fresh start)
    top: tuple[dict, ...] = ()  # the kept validation checkpoints (``Checkpointer.top``)


def resume(
    where: str | os.PathLike | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    scheduler: LRScheduler | None = None,
    learned: nn.Module | None = None,
) -> Resumed:
    """Load the checkpoint at ``where`` (a run folder or file) into model, the learner's own
    meta-parameters, optimiser, the outer learning-rate schedule and RNGs.

    ``None``: nothing to resume, a fresh start. The model must match the checkpoint's.
    """
    if not where:
        return Resumed()
    path = resolve(where)
    state = load(path, device)
    load_weights(state, model, learned, f"resume={where}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if not state.get("scheduler"):
            raise UserError(
                f"resume={where}: the checkpoint has no outer learning-rate schedule but "
                f"outer.scheduler is set; resume with the run's own outer settings"
            )
        scheduler.load_state_dict(state["scheduler"])
    elif state.get("scheduler"):
        raise UserError(
            f"resume={where}: the checkpoint's run had an outer learning-rate schedule but "
            f"outer.scheduler is null; resume with the run's own outer settings"
        )
    set_rng_state(state["rng"])
    extra = state["extra"]
    return Resumed(
        state["step"],
        extra.get("train_time", 0.0),
        state["best"],
        extra.get("wandb_run_id"),
        path,
        tuple(extra.get("top", ())),
    )


def top_path(folder: Path, step: int) -> Path:
    """Where the kept validation checkpoint of ``step`` lives (``trainer.keep_best`` > 1)."""
    return folder / TOP / f"step{step}.pt"


class Checkpointer:
    """Saves ``checkpoints/last.pt`` for the trainer, ``best.pt`` when validation improves and,
    with ``keep_best`` > 1, the ``keep_best`` best validation steps' θ in ``checkpoints/top/``.

    Args:
        run_dir: the run folder; checkpoints go to its ``checkpoints/``.
        config: the resolved config, saved in every checkpoint.
        run_id: the W&B run id, so a resumed run continues the same W&B run.
        keep_best: validation checkpoints kept for ``maml-run evaluate --ensemble``.
        top: the kept ones of a resumed run (``Resumed.top``); files of later steps that a
            killed run left behind are removed.
    """

    def __init__(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: dict,
        run_id: str | None,
        scheduler: LRScheduler | None = None,
        learned: nn.Module | None = None,
        keep_best: int = 1,
        top: tuple[dict, ...] = (),
    ) -> None:
        self.folder = run_dir / "checkpoints"
        self.model, self.optimizer, self.config, self.run_id = model, optimizer, config, run_id
        self.scheduler, self.learned = scheduler, learned
        self.keep_best, self.top = keep_best, list(top)
        kept = {top_path(self.folder, r["step"]) for r in self.top}
        for stale in (self.folder / TOP).glob("step*.pt"):
            if stale not in kept:
                _remove(stale)

    def validated(self, step: int, this: dict, maximize: bool, train_time: float) -> None:
        """Keep θ of ``step`` in ``checkpoints/top/`` if it is among the ``keep_best`` best
        validation steps so far (a NaN score never is); drop the one it displaces."""
        if self.keep_best <= 1 or not math.isfinite(this["value"]):
            return
        entry = {"value": this["value"], "step": step}
        sign = -1.0 if maximize else 1.0
        ranked = sorted([*self.top, entry], key=lambda r: sign * r["value"])  # ties: earlier
        kept, dropped = ranked[: self.keep_best], ranked[self.keep_best :]
        if entry not in kept:
            return
        self._write(f"{TOP}/step{step}.pt", step, None, train_time)
        self.top = kept
        for old in dropped:
            _remove(top_path(self.folder, old["step"]))

    def save(self, step: int, best: dict | None, train_time: float) -> None:
        """``checkpoints/last.pt``: the run at ``step``, to resume from."""
        self._write(LAST, step, best, train_time)

    def save_best(self, step: int, best: dict, train_time: float) -> None:
        """``checkpoints/best.pt``: θ at the best validation step (called at that step)."""
        self._write(BEST, step, best, train_time)

    def _write(self, name: str, step: int, best: dict | None, train_time: float) -> None:
        try:
            save(
                self.folder / name,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                learned=self.learned,
                step=step,
                config=self.config,
                best=best,
                extra={"train_time": train_time, "wandb_run_id": self.run_id, "top": self.top},
            )
        except UserError as err:  # say how to go on: resume from last.pt, or start over
            run = self.folder.parent
            then = f"resume={run}" if (self.folder / LAST).is_file() else "run again"
            raise UserError(f"{err}, then {then}") from None


class NullCheckpointer:
    """Writes nothing: torchrun's ranks other than 0 (rank 0 alone writes checkpoints)."""

    def save(self, step: int, best: dict | None, train_time: float) -> None:
        pass

    def save_best(self, step: int, best: dict, train_time: float) -> None:
        pass

    def validated(self, step: int, this: dict, maximize: bool, train_time: float) -> None:
        pass
