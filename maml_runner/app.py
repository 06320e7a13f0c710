"""The Hydra task function: seed → build → fit → meta-test → metrics.json, plots, W&B.

``main`` is the ``@hydra.main`` entry, so ``--multirun``, sweeper and launcher plugins and the
per-job ``.hydra/`` snapshots all work. Everything is written under Hydra's output folder.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from maml_runner import checkpoint, config, distributed, plots
from maml_runner.build import Experiment, RLExperiment, build, build_optimizer, build_rl, is_rl
from maml_runner.errors import UserError
from maml_runner.evaluation import EvalResult, meta_test
from maml_runner.memory import keep_freed_memory
from maml_runner.paths import conf_dir
from maml_runner.tracking import NullTracker, Tracker
from maml_runner.trainer import Diverged, auto_tasks_per_pass, fit, gradient_step

config.register()
console = Console()
METRICS = "metrics.json"


class Checkpoints:
    """Saves ``checkpoints/last.pt`` for the trainer (and ``best.pt`` when validation improves)."""

    def __init__(self, run_dir: Path, model, optimizer, cfg: dict, tracker: Tracker):
        self.folder = run_dir / "checkpoints"
        self.model, self.optimizer, self.cfg, self.tracker = model, optimizer, cfg, tracker
        self.best_step: int | None = None

    def save(self, step: int, best: dict | None, train_time: float) -> None:
        extra = {"train_time": train_time, "wandb_run_id": self.tracker.run_id}
        kwargs = dict(
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            config=self.cfg,
            best=best,
            extra=extra,
        )
        checkpoint.save(self.folder / checkpoint.LAST, **kwargs)
        if best is not None and best["step"] == step and best["step"] != self.best_step:
            checkpoint.save(self.folder / "best.pt", **kwargs)
            self.best_step = step


def evaluate(exp: Experiment, cfg: DictConfig) -> EvalResult:
    """The paper's meta-test protocol on ``exp.test_tasks`` (see ``evaluation.meta_test``)."""
    return meta_test(
        exp.model,
        exp.task_loss,
        dict(exp.model.named_parameters()),
        exp.test_tasks,
        lr=cfg.inner.lr,
        steps=cfg.inner.eval_steps,
    )


def print_result(result: EvalResult, report_steps: list[int], paper: dict | None) -> None:
    from rich.table import Table

    table = Table(title=f"meta-test on {result.num_tasks} held-out tasks (mean ± 95% CI)")
    table.add_column("inner steps", justify="right")
    metrics = list(result.mean)
    for metric in metrics:
        table.add_column(metric, justify="right")
    paper_values = {}
    if paper:
        paper_values = dict(zip(paper["steps"], paper["mean"]))
        table.add_column(f"paper {paper['metric']}", justify="right")
    for step in report_steps:
        row = [str(step)] + [
            f"{result.mean[m][step]:.4f} ± {result.ci95[m][step]:.4f}" for m in metrics
        ]
        if paper:
            row.append(f"{paper_values[step]:.3g}" if step in paper_values else "")
        table.add_row(*row)
    console.print(table)


def _paper_curve(cfg: DictConfig, metric: str) -> dict | None:
    """The preset's paper numbers as ``{label: (steps, values)}`` for a plot of ``metric``."""
    if not (cfg.paper and cfg.paper.metric == metric):
        return None
    return {cfg.algorithm.name: (list(cfg.paper.steps), list(cfg.paper.mean))}


def write_plots(exp: Experiment, cfg: DictConfig, result: EvalResult, run_dir: Path) -> dict:
    label = cfg.algorithm.name
    paper = _paper_curve(cfg, "query_loss")
    images = {
        "plots/adaptation": plots.adaptation_curves(
            {label: result}, run_dir / "adaptation.png", paper=paper
        )
    }
    num = min(cfg.eval.plot_tasks, result.num_tasks)
    if num and hasattr(exp.family, "curve"):
        tasks = exp.test_tasks.first(num)
        lo, hi = exp.family.x_min, exp.family.x_max
        grid = torch.linspace(lo, hi, 200, device=exp.device).view(1, -1, 1).expand(num, -1, -1)
        truth = exp.family.curve(tasks.info, grid)
        steps = sorted({0, 1, cfg.inner.eval_steps})
        images["plots/tasks"] = plots.regression_tasks(
            exp.model,
            exp.task_loss,
            dict(exp.model.named_parameters()),
            tasks,
            truth,
            grid,
            run_dir / "tasks.png",
            lr=cfg.inner.lr,
            steps=steps,
        )
    return images


class NoCheckpoints:
    """torchrun's ranks other than 0: rank 0 alone writes checkpoints."""

    def save(self, step: int, best: dict | None, train_time: float) -> None:
        pass


def _resume(
    cfg: DictConfig, model, optimizer, device
) -> tuple[int, float, dict | None, str | None]:
    """Load ``cfg.resume`` into model (and optimiser); return step, train time, best, W&B id."""
    if not cfg.resume:
        return 0, 0.0, None, None
    path = checkpoint.resolve(cfg.resume)
    state = checkpoint.load(path, device)
    checkpoint.check_model(model, state, str(cfg.resume))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    if distributed.is_lead():
        console.print(f"resuming from {path} at step {state['step']}")
    extra = state["extra"]
    return state["step"], extra.get("train_time", 0.0), state["best"], extra.get("wandb_run_id")


def _tracker(cfg: DictConfig, run_dir: Path, multirun: bool, resolved: dict, run_id):
    if not distributed.is_lead():
        return NullTracker()
    group = cfg.logger.group
    if group is None and multirun:
        group = Path(HydraConfig.get().sweep.dir).name
    return Tracker(
        run_dir,
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=group,
        tags=list(cfg.logger.tags),
        config=resolved,
        run_id=run_id,
        name=None if not multirun else f"{group}/{HydraConfig.get().job.num}",
    )


def _train(update, params, cfg: DictConfig, run_dir: Path, multirun: bool, **kwargs):
    """``fit`` with the run's cadence; divergence and Ctrl-C end the run with a clear message.

    Returns the ``FitResult``, or None when a multirun job diverged (its objective is NaN).
    """
    try:
        fitted = fit(
            update,
            params,
            steps=cfg.trainer.steps,
            val_every=cfg.trainer.val_every,
            checkpoint_every=cfg.trainer.checkpoint_every,
            log_every=cfg.trainer.log_every,
            progress=cfg.trainer.progress and distributed.is_lead(),
            **kwargs,
        )
    except Diverged as err:
        if not distributed.is_lead():
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
    if fitted.interrupted and not distributed.is_lead():
        raise SystemExit(130)
    if fitted.interrupted:
        console.print(
            f"interrupted at step {fitted.step}; checkpoint saved. Continue with:\n"
            f"  maml-run resume={run_dir}"
        )
        raise SystemExit(130)
    if distributed.is_lead():
        device = next(iter(params.values())).device
        console.print(
            f"meta-trained {fitted.step} iterations in {fitted.train_time:.1f} s "
            f"({fitted.it_per_s:.3g} it/s this session) on {device_name(device)}"
        )
    return fitted


def _tasks_per_pass(cfg: DictConfig, exp: Experiment, start: int) -> int:
    """Resolve ``trainer.tasks_per_pass`` (``auto`` looks at the first meta-batch) and say it."""
    per_pass = cfg.trainer.tasks_per_pass
    if per_pass == "auto":
        per_pass = auto_tasks_per_pass(exp.model, exp.stream.batch(start))
    size = cfg.trainer.meta_batch_size
    if per_pass < size and distributed.is_lead():
        how = f"auto on {exp.device.type}" if cfg.trainer.tasks_per_pass == "auto" else "set"
        console.print(
            f"meta-batch of {size} tasks in passes of {per_pass} "
            f"(trainer.tasks_per_pass: {how}; same meta-gradient)"
        )
    return per_pass


def _report(run_dir: Path, tracker, metrics: dict, result: EvalResult, images: dict) -> None:
    """Write metrics.json, the W&B summary and plots; say where the run folder is."""
    step = metrics["train"]["steps"]
    (run_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    _summarise(tracker, result, step)
    tracker.log_images(images, step)
    console.print(f"run folder: {run_dir} (metrics.json, adaptation.png, checkpoints/)")


def _metrics(cfg: DictConfig, result: EvalResult, fitted, device, objective: float) -> dict:
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {
        "experiment": choices.get("experiment"),
        "task": cfg.task.name,
        "algorithm": cfg.algorithm.name,
        "first_order": cfg.inner.first_order,
        "k_shot": cfg.task.k_shot,
        "eval_k_shot": cfg.task.eval_k_shot,
        "seed": cfg.seed,
        "meta_test": result.to_dict(),
        "meta_val": {"best": fitted.best},
        "train": {
            "steps": fitted.step,
            "train_time_s": fitted.train_time,
            "it_per_s": fitted.it_per_s,
        },
        "hardware": {"device": device_name(device), "torch": torch.__version__},
        "paper": OmegaConf.to_container(cfg.paper) if cfg.paper else None,
        "objective": objective,
    }


def _summarise(tracker: Tracker, result: EvalResult, step: int) -> None:
    summary = {}
    for metric in result.mean:
        for s in result.inner_steps:
            summary[f"meta_test/{metric}_step{s}"] = result.mean[metric][s]
            summary[f"meta_test/{metric}_ci95_step{s}"] = result.ci95[metric][s]
    tracker.log({f"meta_test/{m}": result.mean[m][-1] for m in result.mean}, step)
    tracker.summary(summary)


def run(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> float:
    """Train and meta-test one config in ``run_dir``; return the objective (lower is better).

    Under torchrun every rank trains its share of each meta-batch; rank 0 (``lead``) alone logs,
    checkpoints, validates and meta-tests, and the other ranks return NaN.
    """
    keep_freed_memory()  # host tensors reused, not page-faulted anew each meta-step
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if is_rl(cfg):
        if distributed.launched():
            raise UserError(
                f"task={cfg.task.name}: RL runs do not split over torchrun ranks; run it with "
                f"maml-run (its environments already step in task.workers processes)"
            )
        return run_rl(cfg, run_dir, multirun=multirun)
    distributed.init_from_env()
    lead = distributed.is_lead()
    exp = build(cfg)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    optimizer = build_optimizer(cfg.outer, exp.model)
    params = dict(exp.model.named_parameters())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    start, train_time, best, run_id = _resume(cfg, exp.model, optimizer, exp.device)
    if distributed.world_size() > 1:
        distributed.broadcast_params(params)
    tracker = _tracker(cfg, run_dir, multirun, resolved, run_id)
    exit_code = 1
    try:
        validate = None
        if exp.val_tasks is not None and lead:

            def validate() -> dict[str, float]:
                r = meta_test(
                    exp.model,
                    exp.task_loss,
                    params,
                    exp.val_tasks,
                    lr=cfg.inner.lr,
                    steps=cfg.inner.eval_steps,
                )
                return {f"meta_val/{m}": r.mean[m][-1] for m in r.mean}

        per_pass = _tasks_per_pass(cfg, exp, start)
        update, stop = gradient_step(exp.learner, params, optimizer, exp.stream, per_pass), None
        if distributed.world_size() > 1:
            update = distributed.DistributedStep(
                exp.learner, params, optimizer, exp.stream, per_pass
            )
            stop = update.stop
        fitted = _train(
            update,
            params,
            cfg,
            run_dir,
            multirun,
            tracker=tracker,
            checkpointer=Checkpoints(run_dir, exp.model, optimizer, resolved, tracker)
            if lead
            else NoCheckpoints(),
            start_step=start,
            train_time=train_time,
            validate=validate,
            best=best,
            stop=stop,
        )
        if fitted is None:
            return float("nan")
        if not lead:
            exit_code = 0
            return float("nan")  # rank 0 evaluates and reports the objective
        result = evaluate(exp, cfg)
        print_result(result, list(cfg.eval.report_steps), cfg.paper)
        objective = result.mean["query_loss"][-1]
        metrics = _metrics(cfg, result, fitted, exp.device, objective)
        _report(run_dir, tracker, metrics, result, write_plots(exp, cfg, result, run_dir))
        exit_code = 0
        return objective
    finally:
        tracker.close(exit_code)


def rl_adaptation(exp: RLExperiment, cfg: DictConfig, params, tasks, steps: int, seed: int):
    """Returns of ``tasks`` after 0..steps policy-gradient steps from ``params`` (seeded)."""
    from maml_runner.tasks.base import make_generator

    return exp.learner.adaptation(
        params,
        tasks,
        steps=steps,
        lr=cfg.inner.lr,
        halve_lr=cfg.task.eval_halve_lr,
        generator=make_generator(seed, torch.device("cpu")),
    )


def rl_meta_test(exp: RLExperiment, cfg: DictConfig, params) -> tuple[EvalResult, Any]:
    """The paper's RL test: mean return (± 95% CI over test tasks) after 0..eval_steps steps."""
    from maml_runner.evaluation import mean_ci95

    adapted = rl_adaptation(exp, cfg, params, exp.test_tasks, cfg.inner.eval_steps, cfg.eval.seed)
    mean, ci95 = mean_ci95(adapted.returns)
    steps, num = adapted.returns.shape
    return EvalResult(list(range(steps)), num, {"return": mean}, {"return": ci95}), adapted


def run_rl(cfg: DictConfig, run_dir: Path, *, multirun: bool = False) -> float:
    """MAML-TRPO (or the pretrained baseline) on an RL task family; objective = −final return."""
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(cfg.trainer.num_threads)
    exp = build_rl(cfg)
    learner = exp.learner
    resolved = OmegaConf.to_container(cfg, resolve=True)
    exit_code = 1
    try:
        start, train_time, best, run_id = _resume(cfg, exp.model, None, exp.device)
        tracker = _tracker(cfg, run_dir, multirun, resolved, run_id)
    except BaseException:
        exp.env.close()
        raise

    try:
        validate = None
        if cfg.trainer.val_every > 0:

            def validate() -> dict[str, float]:
                r = rl_adaptation(exp, cfg, learner.params, exp.val_tasks, 1, cfg.trainer.val_seed)
                return {"meta_val/return_step1": r.returns[-1].mean().item()}

        fitted = _train(
            learner.update,
            learner.params,
            cfg,
            run_dir,
            multirun,
            tracker=tracker,
            checkpointer=Checkpoints(run_dir, exp.model, None, resolved, tracker),
            start_step=start,
            train_time=train_time,
            validate=validate,
            val_key="meta_val/return_step1",
            maximize=True,
            best=best,
            metrics=("meta_train/return_post", "meta_train/return_pre"),
        )
        if fitted is None:
            return float("nan")
        result, ours = rl_meta_test(exp, cfg, learner.params)
        baseline, _ = rl_meta_test(exp, cfg, exp.initial_state)
        print_result(result, list(cfg.eval.report_steps), cfg.paper)
        returns = ", ".join(f"{m:.2f}" for m in baseline.mean["return"])
        console.print(
            f"random initialisation, return after 0..{len(result.inner_steps) - 1} steps: {returns}"
        )
        objective = -result.mean["return"][-1]
        metrics = _metrics(cfg, result, fitted, exp.device, objective)
        metrics["baselines"] = {"random_init": baseline.to_dict()}
        images = {
            "plots/adaptation": plots.adaptation_curves(
                {cfg.algorithm.name: result, "random init": baseline},
                run_dir / "adaptation.png",
                metric="return",
                paper=_paper_curve(cfg, "return"),
                title=f"{cfg.task.name}: return after policy-gradient steps (mean ± 95% CI)",
            )
        }
        if cfg.task.env == "nav2d" and cfg.eval.plot_tasks:
            images["plots/trajectories"] = plots.nav_trajectories(
                ours.episodes, exp.test_tasks, run_dir / "trajectories.png", cfg.eval.plot_tasks
            )
        _report(run_dir, tracker, metrics, result, images)
        exit_code = 0
        return objective
    finally:
        tracker.close(exit_code)
        exp.env.close()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra's entry: run one job in its output folder; bad input ends it with one line."""
    hc = HydraConfig.get()
    try:
        return run(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)
    except UserError as err:
        if os.environ.get("MAML_RUNNER_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
