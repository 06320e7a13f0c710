"""The run folder: each run claims its own, a refused run leaves none, a resume keeps its own.

Hydra writes its ``.hydra/`` snapshot before the run function starts, so these rules sit on
both sides of it: ``own_folder`` (the CLI, before Hydra), ``record_overrides`` and ``unclaim``
(the run, once its checks passed or failed).
"""

from __future__ import annotations

import datetime
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from maml_runner.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

RUN_MARKS = (".hydra", "metrics.jsonl", "metrics.json", "checkpoints")  # a folder holds a run


def _claim(pattern: str) -> str:
    """A new folder named by the clock (``outputs/DATE/TIME``), created now, so that two runs
    started in the same second never share one: the second gets ``TIME-1``, and so on."""
    base = datetime.datetime.now().strftime(pattern)
    for n in range(1000):
        name = base if n == 0 else f"{base}-{n}"
        try:
            Path(name).mkdir(parents=True)
            return name
        except FileExistsError:
            continue
    raise UserError(f"hydra.run.dir={base}: 1000 runs started this second; name a folder")


def _given(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    return values[-1] if values else None


def own_folder(overrides: list[str], cfg) -> list[str]:
    """Give a run (or a sweep) a folder of its own; refuse one that already holds a run.

    A resume (``resume=RUN``) writes into RUN, and Hydra's snapshot is written by the run only
    once its checks pass (``hydra.output_subdir=null`` here; see ``app.record_overrides``).
    Hydra's own flags (``--cfg``, ``--info``, ...) print and exit: they are left alone.
    """
    flags = [o for o in overrides if o.startswith("-")]
    if cfg is None:  # Hydra's own flags (--cfg, --info, ...): they print and exit
        return overrides
    resuming = _given(overrides, "resume") not in (None, "", "null")
    if resuming:
        return [*overrides, "hydra.output_subdir=null"]
    multirun = bool(flags) or str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = _given(overrides, key)
    if folder is None:
        pattern = "multirun/%Y-%m-%d/%H-%M-%S" if multirun else "outputs/%Y-%m-%d/%H-%M-%S"
        return [*overrides, f"{key}={_claim(pattern)}"]
    path = Path(folder).expanduser()
    held = [m for m in RUN_MARKS if (path / m).exists()]
    if multirun and path.is_dir() and any(path.iterdir()):
        held = held or ["jobs"]
    if held:
        raise UserError(
            f"{key}={folder}: already holds a run ({', '.join(held)}); continue it with "
            f"maml-run resume={folder}, or choose another folder"
        )
    return overrides


def record_overrides(cfg: DictConfig, run_dir: Path) -> None:
    """A resume's Hydra snapshot, written once its checks passed (``own_folder`` turns
    Hydra's own off), so a refused resume leaves the run folder as it was."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    overrides = [o for o in HydraConfig.get().overrides.task if o != "hydra.output_subdir=null"]
    OmegaConf.save(OmegaConf.create(overrides), folder / "overrides.yaml")
    OmegaConf.save(cfg, folder / "config.yaml")


def unclaim(run_dir: Path) -> None:
    """A refused run leaves no folder behind: remove what Hydra wrote before the run began
    (its ``.hydra/`` snapshot, and its log when nothing else is there), then the folder. A
    resume wrote no snapshot, and anything else in the folder is kept."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if hc.output_subdir is None:  # a resume: its folder is the run's, left as it was
        return
    shutil.rmtree(run_dir / hc.output_subdir, ignore_errors=True)
    log = run_dir / f"{hc.job.name}.log"
    if log.is_file() and [p.name for p in run_dir.iterdir()] == [log.name]:
        log.unlink()  # the log of this refused run (e.g. "decoding Omniglot"), alone in it
    folders = [run_dir]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_dir.parent.name):
        folders.append(run_dir.parent)  # the DATE folder of a claimed outputs/DATE/TIME
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: it held something before this run
