"""The Hydra entry and the one recipe of every run: build → resume → fit → meta-test → report.

``main`` is the ``@hydra.main`` entry, so ``--multirun``, sweeper and launcher plugins and the
per-job ``.hydra/`` snapshots all work. Everything is written under Hydra's output folder.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from maml_runner import checkpoint, config, distributed, report, run_folder, tracking
from maml_runner.build import build, build_tracker
from maml_runner.errors import InvalidArgument, UserError
from maml_runner.job import Job
from maml_runner.memory import keep_freed_memory
from maml_runner.paths import conf_dir
from maml_runner.trainer import Diverged, FitResult, fit

config.register()
console = report.console


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> float:
    """Train and meta-test one config in ``run_dir``; return the objective (lower is better).

    Under torchrun every rank trains its share of each meta-batch; rank 0 (``lead``) alone logs,
    checkpoints, validates and meta-tests, and the other ranks return NaN.
    """
    keep_freed_memory()  # host tensors reused, not page-faulted anew each meta-step
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    with build(cfg) as job:
        if job.num_threads is not None:
            torch.set_num_threads(job.num_threads)
        resumed = checkpoint.resume(
            job.resume, job.model, job.optimizer, job.device, job.scheduler, job.learned
        )
        lead = distributed.is_lead()
        if resumed.path is not None:
            if job.cadence.steps < resumed.step:
                raise UserError(
                    f"trainer.steps={job.cadence.steps}: {resumed.path} is at step "
                    f"{resumed.step}; give trainer.steps >= {resumed.step}"
                )
            if lead:
                run_folder.record_overrides(cfg, run_dir)
                tracking.keep_history_until(run_dir, resumed.step)
                console.print(f"resuming from {resumed.path} at step {resumed.step}")
        if distributed.world_size() > 1:
            distributed.broadcast_params(job.meta_parameters())
        tracker = build_tracker(cfg, run_dir, job.config, resumed.run_id, multirun)
        exit_code = 1
        try:
            fitted = _train(job, run_dir, multirun, tracker, resumed)
            if fitted is None or not lead:  # diverged in a sweep; or rank 0 reports
                exit_code = 0 if fitted is not None else 1
                return float("nan")
            selected = job.select(fitted, run_dir)  # θ chosen on validation, never on test
            tested = job.meta_test()
            report.finish(run_dir, tracker, job, tested, fitted, selected)
            exit_code = 0
            return selected.objective
        finally:
            tracker.close(exit_code)


def _train(job: Job, run_dir: Path, multirun: bool, tracker, resumed) -> FitResult | None:
    """``fit`` the job; divergence and Ctrl-C end the run with a clear message.

    Returns the ``FitResult``, or None when a multirun job diverged (its objective is NaN).
    """
    lead = distributed.is_lead()
    saver = (
        checkpoint.Checkpointer(
            run_dir,
            job.model,
            job.optimizer,
            job.config,
            tracker.run_id,
            job.scheduler,
            job.learned,
            keep_best=job.keep_best,
            top=resumed.top,
        )
        if lead
        else checkpoint.NullCheckpointer()
    )
    try:
        fitted = fit(
            job.update,
            job.meta_parameters(),
            job.cadence,
            tracker=tracker,
            checkpointer=saver,
            resumed=resumed,
            validation=job.validation if lead else None,
            metrics=job.metrics,
            stop=job.stop,
        )
    except Diverged as err:
        if not lead:
            raise SystemExit(1) from None
        last = run_dir / "checkpoints" / checkpoint.LAST
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint kept"
        console.print(
            f"[red]error:[/] the training figures or θ became NaN/inf by step "
            f"{err.step}; {kept}. Try a smaller inner.lr or outer.lr."
        )
        if multirun:
            return None
        raise SystemExit(1) from None
    if fitted.interrupted and not lead:
        raise SystemExit(130)
    if fitted.interrupted:
        console.print(
            f"interrupted at step {fitted.step}; checkpoint saved. Continue with:\n"
            f"  maml-run resume={run_dir}"
        )
        raise SystemExit(130)
    if lead:
        console.print(
            f"meta-trained {fitted.step} iterations in {fitted.train_time:.1f} s "
            f"({fitted.it_per_s:.3g} it/s this session) on {report.device_name(job.device)}"
        )
    return fitted


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra's entry: run one job in its output folder; bad input ends it with one line."""
    hc = HydraConfig.get()
    try:
        return run(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)
    except (UserError, InvalidArgument) as err:  # InvalidArgument: a parameter build did not map
        if os.environ.get("MAML_RUNNER_TRACEBACK"):
            raise
        run_folder.unclaim(Path(hc.runtime.output_dir))
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
