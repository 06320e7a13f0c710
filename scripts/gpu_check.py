"""Check maml-runner on a GPU machine in one short session, everything written under ``$OUT``.

1. The bench (``python scripts/bench --device cuda``) on Omniglot 5w1s, 20w1s and the
   miniImageNet-shaped 5w1s against learn2learn and higher, installed from the baselines folder
   (``../shared/device/baselines``) into a temporary folder: the float64 meta-gradient agreement
   first, then it/s and peak memory per library (``bench.txt``).
2. ``maml-run experiment=finn17_omniglot_5w1s`` for as long as the rest of the time allows: a
   warm-up of ``--warmup-steps`` iterations (with its 600-task meta-test) measures the speed and
   the time a run takes besides training; the run is then resumed to the number of iterations
   that fits (the preset's 60,000 if they fit), keeping its checkpoints, and meta-tested on 600
   tasks. The accuracy ± 95% CI is printed beside the paper's 98.7 ± 0.4%, with the wall time
   (``omniglot_5w1s/`` is the run folder, ``summary.json`` the figures).

``--dry-run`` takes the same steps on CPU at tiny sizes: higher only, the bench on the sinusoid
(5 meta-iterations), 2 + 2 iterations of 2 tasks on 1 thread, a meta-test on 4 tasks.

How to run (from the project's root; see the README's "On a GPU")
    bash ../shared/device/prepare.sh      # here, before: wheels of hydra, omegaconf, wandb
    bash scripts/gpu_check.sh             # there, after the install line prepare.sh prints
    bash scripts/gpu_check.sh --dry-run   # here: the same steps on CPU at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BENCH_WORKLOADS = "omniglot-5w1s,omniglot-20w1s,miniimagenet-5w1s"
PRESET_STEPS = 60_000  # finn17_omniglot_5w1s: the paper's meta-iterations
PAPER = (98.7, 0.4)  # Finn et al. 2017, Table 1: Omniglot 5-way 1-shot accuracy, %


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, end to end")
    parser.add_argument("--out", type=Path, help="where to write (default: $OUT)")
    parser.add_argument(
        "--minutes", type=float, default=9.0, help="the whole check's time (default 9)"
    )
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "omniglot")
    parser.add_argument("--baselines", type=Path, default=SHARED / "device" / "baselines")
    parser.add_argument("--cache-dir", help="data.cache_dir of the runs (default: the preset's)")
    parser.add_argument(
        "--bench-seconds", type=float, default=5.0, help="bench: seconds per library (default 5)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=300, help="iterations that measure the speed"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        if not os.environ.get("OUT"):
            parser.error("no output folder: set $OUT or pass --out DIR")
        args.out = Path(os.environ["OUT"])
    if not (args.data / "images_background.zip").is_file():
        parser.error(f"--data {args.data}: no images_background.zip; pass the Omniglot folder")
    if args.dry_run:
        args.warmup_steps = min(args.warmup_steps, 2)
    return args


class Log:
    """Print a line and keep it in ``$OUT/gpu_check.txt``."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", buffering=1)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")


def run_logged(command: list[str], log_path: Path, env: dict[str, str], timeout: float) -> int:
    """Run ``command``, its output both on the console and in ``log_path``; return its status.

    Past ``timeout`` seconds it is killed and 124 returned (what it wrote stays in the log).
    """
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        timer = threading.Timer(max(timeout, 1.0), proc.kill)
        timer.start()
        try:
            for line in proc.stdout or ():
                sys.stdout.write(line)
                log.write(line)
            code = proc.wait()
        finally:
            killed = not timer.is_alive()
            timer.cancel()
        if killed and code != 0:
            log.write(f"(killed after {timeout:.0f} s)\n")
            return 124
        return code


def install_baselines(folder: Path, target: Path, log: Log, out: Path, *, dry_run: bool) -> None:
    """higher from its wheel; learn2learn re-cythonised from its sdist (not in a dry run)."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    pip += ["--disable-pip-version-check", "--target", str(target)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    steps = [("higher", [*pip, *map(str, folder.glob("higher-*.whl"))])]
    if dry_run:
        log("dry run: higher only (learn2learn is built with the baselines' CPython 3.12 Cython)")
    else:
        steps += [
            ("cython", [*pip, *map(str, folder.glob("cython-*.whl"))]),
            (
                "learn2learn",
                [*pip, "--no-build-isolation", "--config-settings=--build-option=build_ext"]
                + [*map(str, folder.glob("learn2learn-*.tar.gz"))],
            ),
        ]
    for name, command in steps:
        start = time.monotonic()
        code = run_logged(command, out / f"install_{name}.log", env, timeout=300)
        state = "installed" if code == 0 else f"FAILED (exit {code}, see install_{name}.log)"
        log(f"{name}: {state} in {time.monotonic() - start:.0f} s")


def bench(args: argparse.Namespace, target: Path, log: Log, device: str) -> None:
    """The bench on the three conv workloads against both baselines, into ``bench.txt``."""
    command = [sys.executable, str(ROOT / "scripts" / "bench"), "--device", device]
    if args.dry_run:
        command += ["--workload", "sinusoid", "--quick", "--iters", "5", "--warmup", "0"]
        command += ["--threads", "1"]
    else:
        command += ["--workload", BENCH_WORKLOADS, "--seconds", f"{args.bench_seconds:g}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), _pythonpath()])}
    start = time.monotonic()
    timeout = min(360.0, args.deadline - time.monotonic())
    code = run_logged(command, args.out / "bench.txt", env, timeout)
    log(f"bench: exit {code} in {time.monotonic() - start:.0f} s (bench.txt)")


def _pythonpath() -> str:
    return os.environ.get("PYTHONPATH", "")


def maml_run(overrides: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """``maml-run OVERRIDES`` (as ``python -m maml_runner``); return its status and wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), _pythonpath()])}
    env["WANDB_SILENT"] = "true"
    start = time.monotonic()
    code = run_logged([sys.executable, "-m", "maml_runner", *overrides], log_path, env, timeout)
    return code, time.monotonic() - start


def reproduce(args: argparse.Namespace, log: Log, device: str, deadline: float) -> dict | None:
    """Omniglot 5w1s: warm up, resume to the iterations that fit, meta-test; the figures."""
    run_dir = args.out / "omniglot_5w1s"
    common = [
        "experiment=finn17_omniglot_5w1s",
        f"data.root={args.data}",
        f"device={device}",
        "logger.mode=disabled",
        f"hydra.run.dir={run_dir}",
    ]
    if args.cache_dir:
        common.append(f"data.cache_dir={args.cache_dir}")
    if args.dry_run:  # tiny sizes: few tasks per meta-batch, validation and meta-test
        common += ["trainer.meta_batch_size=2", "trainer.val_tasks=2", "eval.num_tasks=4"]
        common.append("trainer.num_threads=1")  # as the bench: 1 thread, on a shared CPU
    warm = args.warmup_steps
    cadence = [f"trainer.val_every={warm}", f"trainer.checkpoint_every={warm}"]
    code, wall = maml_run(
        [*common, f"trainer.steps={warm}", *cadence],
        args.out / "omniglot_warmup.log",
        timeout=max(deadline - time.monotonic(), 1),
    )
    metrics_path = run_dir / "metrics.json"
    if code != 0 or not metrics_path.is_file():
        log(f"omniglot warm-up: FAILED (exit {code}, see omniglot_warmup.log)")
        return None
    first = json.loads(metrics_path.read_text())
    rate = first["train"]["it_per_s"]
    overhead = wall - first["train"]["train_time_s"]  # start-up, data, validation, meta-test
    left = deadline - time.monotonic()
    fits = int(rate * (left - 1.2 * overhead) * 0.9)  # 10% margin for validation and noise
    cap = 2 * warm if args.dry_run else PRESET_STEPS
    steps = max(min(fits, cap), warm)
    log(
        f"omniglot warm-up: {warm} iterations at {rate:.3g} it/s, {overhead:.0f} s besides "
        f"training; {left:.0f} s left: resuming to {steps:,} iterations"
        + ("" if steps >= PRESET_STEPS else f" of the preset's {PRESET_STEPS:,}")
    )
    every = steps if args.dry_run else max(steps // 5, 1)  # validate and checkpoint 5 times
    total_wall = wall
    if steps > warm:
        resume = [
            f"resume={run_dir}",
            f"trainer.steps={steps}",
            f"trainer.val_every={every}",
            f"trainer.checkpoint_every={every}",
        ]
        code, wall = maml_run(
            [*common, *resume],
            args.out / "omniglot_run.log",
            timeout=max(deadline - time.monotonic(), 1),
        )
        total_wall += wall
        if code != 0:
            log(f"omniglot run: FAILED (exit {code}, see omniglot_run.log)")
            return None
    metrics = json.loads(metrics_path.read_text())
    test = metrics["meta_test"]
    at = test["inner_steps"].index(metrics["paper"]["steps"][-1])
    acc = 100 * test["query_acc"]["mean"][at]
    ci = 100 * test["query_acc"]["ci95"][at]
    return {
        "iterations": metrics["train"]["steps"],
        "it_per_s_warmup": rate,
        "train_time_s": metrics["train"]["train_time_s"],
        "wall_s": total_wall,
        "meta_test_tasks": test["num_tasks"],
        "inner_steps": test["inner_steps"][at],
        "query_acc_pct": acc,
        "query_acc_ci95_pct": ci,
        "paper_pct": PAPER[0],
        "paper_ci95_pct": PAPER[1],
        "hardware": metrics["hardware"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    args.deadline = deadline - 60  # the bench leaves at least a minute for the run
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.txt")
    device = "cpu" if args.dry_run else "cuda"
    log(f"gpu_check{' --dry-run' if args.dry_run else ''}: {args.minutes:g} min, into {args.out}")
    with tempfile.TemporaryDirectory(prefix="baselines-") as target:
        install_baselines(args.baselines, Path(target), log, args.out, dry_run=args.dry_run)
        bench(args, Path(target), log, device)
    result = reproduce(args, log, device, deadline - 20)  # 20 s for writing and leaving
    if result is None:
        return 1
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    acc, ci = result["query_acc_pct"], result["query_acc_ci95_pct"]
    log(
        f"Omniglot 5-way 1-shot, {result['iterations']:,} iterations, {result['meta_test_tasks']} "
        f"test tasks, {result['inner_steps']} inner steps: {acc:.1f} ± {ci:.1f}% "
        f"(paper: {PAPER[0]} ± {PAPER[1]}%), run wall time {result['wall_s']:.0f} s"
    )
    log(f"gpu_check: done in {time.monotonic() - start:.0f} s")
    return 0 if math.isfinite(acc) else 1


if __name__ == "__main__":
    sys.exit(main())
