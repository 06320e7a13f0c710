"""Benchmark maml-runner's MAML engine against learn2learn and higher on MAML workloads.

What it measures
    Meta-iterations per second, and peak memory, of second-order MAML with Adam(1e-3) as the
    outer optimizer. One meta-iteration is the whole meta-step: inner forwards, inner gradients
    (with their graph), query loss, backward through the adaptation, and the optimizer step.
    Workloads (``--workload``, repeatable or comma-separated; default: the first four; ``all``:
    all five):

    * sinusoid:          the paper's regression setup (Finn et al., 2017, §5.1): an MLP 1-40-40-1
                         with ReLU, 25 tasks of K=10 support and 10 query points, 1 inner SGD
                         step with α=0.01.
    * omniglot-5w1s:     ``Conv4`` (64 filters, stride-2 convs, spatial-mean head) on 28×28×1
                         images, 5-way 1-shot, 15 query images per class, 32 tasks, 1 inner step
                         with α=0.4.
    * omniglot-20w1s:    the same network with 20 outputs, 20-way 1-shot, 15 query per class,
                         16 tasks, 5 inner steps with α=0.1.
    * miniimagenet-5w1s: ``Conv4`` (32 filters, 2×2 max-pooling, flattened head) on 84×84×3
                         images, 5-way 1-shot, 15 query per class, 4 tasks, 5 inner steps with
                         α=0.01.
    * resnet12-narrow-5w1s: ``ResNet12`` at widths 16-40-80-160 (``model=resnet12_narrow``,
                         batch norm) on the miniImageNet shape above, 4 tasks, 5 inner steps
                         with α=0.01; its forward is its own, so ours runs it on the torch.func
                         path.

    Images are uniform noise from a seeded generator and labels are 0..N-1 (speed does not depend
    on pixel values). Batch norm in ``Conv4`` keeps no running statistics, so every library
    normalises each task with its own batch statistics.

    Three implementations start from identical initial weights and see identical task-batch
    tensors (their hashes are compared):

    * ours:        ``maml_runner.maml.MAML.outer_loss`` with the tasks of a pass batched, through
                   ``trainer.meta_backward`` in passes of ``--tasks-per-pass`` tasks (default
                   auto, as maml-run: all tasks on a GPU, passes within 32 MiB of activations
                   on a CPU; the header of each workload says how many), in a process that
                   keeps freed memory (``maml_runner.memory``, as maml-run; ``--malloc all``
                   does the same for the baselines); Adam fused=True, as maml-run builds it;
    * learn2learn: ``l2l.algorithms.MAML``, a loop over tasks with ``clone()`` / ``adapt()``;
    * higher:      ``higher.innerloop_ctx`` with an SGD inner optimizer, a loop over tasks.
    * general:     (``--general-path``) ours with the model forced onto the torch.func path
                   (``maml.engine.FuncEngine``), on the workloads whose model the batched
                   layers cover, so the two engines compare on the same weights; the summary
                   adds general/ours.

    The baselines follow each library's own MAML example and use Adam's defaults.

    ``--algorithm`` (default ``maml``, the rows above) times another learner of the family
    (``maml_runner.maml.family``) as ours, on the same workloads, against learn2learn's
    counterpart where it has one (higher has none of them; Adam over θ and the learner's own
    meta-parameters in every library):

    * metasgd: ours ``MetaSGD`` with every element of α starting at the workload's inner lr;
               learn2learn ``l2l.algorithms.MetaSGD(lr=that)``, clone() / adapt() per task.
    * anil:    ours ``ANIL`` (the head, the last module with parameters, adapts alone);
               learn2learn the pattern of its examples/vision/anil_fc100.py: the body computed
               once per task (support and query each alone, so that batch norm sees the same
               batches as ours) and ``l2l.algorithms.MAML`` wrapping only the head. It needs
               the model as an ``nn.Sequential`` ending in its head, so ResNet-12 has no
               learn2learn row.
    * mamlpp:  ours ``MAMLpp`` with the multi-step loss and per-step learned rates (LSLR),
               second order, no BNWB and no derivative-order annealing. learn2learn has no
               MAML++ class, only examples (examples/vision/mamlpp/); its row follows their
               pattern: ``l2l.algorithms.MAML.clone()`` per task, each inner step re-routing
               every parameter to p − rate[step]·∇p with ``l2l.utils.update_module``, the
               query loss after every step weighted 1/N. The rates are per parameter tensor
               and step, as ours (the example has one per layer and step), starting at the
               inner lr; the MSL weights stay at epoch 0's 1/N (the bench never advances the
               epoch). It covers MSL and LSLR, not BNWB, DA or the example's running
               batch-norm statistics per step.

    Each library runs each workload in a process of its own (spawned), so that its peak memory
    can be told apart: on CPU, that process's peak RSS (Linux VmHWM) above its RSS once imports,
    weights, data and optimizer exist; on CUDA, ``max_memory_allocated`` above the memory
    allocated at that point. (Not ``ru_maxrss``: a spawned process starts with its parent's.)
    The processes of a workload take turns (only one computes at a time) in ``--rounds`` rounds,
    so that a slow drift of the machine affects all alike. The sinusoid runs a fixed number of
    meta-iterations (1000 + 20 warm-up); the image workloads, which take seconds per
    meta-iteration on a CPU, run for a fixed time per library (``--seconds``: 25 s on CPU, 10 s on
    CUDA, after 1 or 3 warm-up meta-iterations) and at least one meta-iteration a round.
    ``--quick`` times 100 sinusoid meta-iterations and a single cold meta-iteration of each image
    workload, in one round, and checks gradients on 1 task: a smoke run, not a measurement.

    Before any timing, the meta-gradient of the outer loss with respect to every meta-parameter (θ,
    and Meta-SGD's α or MAML++'s rates) is computed in float64 by each library's timed code path on
    every selected workload (the sinusoid on its 25 tasks, the image workloads on 2 tasks), and each
    baseline's is compared with ours: the relative difference is max|g_lib - g_ours| / max|g_ours|
    for each parameter tensor, maximised over tensors. A tensor whose gradient is zero in exact
    arithmetic (the conv biases before batch norm, which the normalisation cancels) holds only
    rounding noise, so the denominator is never less than 1e-6 × the largest |g_ours| of the whole
    model. If any difference exceeds 1e-6 the script exits with status 1 without timing anything.

    Other processes on the CPUs distort CPU timings far more than their share (torch's threads
    wait for each other), so the load that other processes put on the CPUs while a workload is
    timed is measured (/proc/stat minus the workers' own CPU time) and flagged above 0.25 cores.
    ``--device cuda`` (the default where CUDA is available) times on the GPU, synchronising
    around each timed chunk.

How to run
    python scripts/bench                          # everything: ~7 min on 2 idle CPU cores
    python scripts/bench --quick                  # a ~1 min smoke run of every workload
    python scripts/bench --quick --only ours --workload sinusoid,omniglot-5w1s --threads 1  # CI
    python scripts/bench --workload sinusoid      # ~75 s
    python scripts/bench --workload omniglot-5w1s,miniimagenet-5w1s --seconds 60
    python scripts/bench --only ours --device cuda
    python scripts/bench --workload omniglot-5w1s --tasks-per-pass 32   # ours in one pass
    python scripts/bench --workload sinusoid --iters 200 --threads 1
    python scripts/bench --general-path --workload sinusoid,omniglot-5w1s   # the two engines
    python scripts/bench --workload resnet12-narrow-5w1s --rounds 1 --seconds 60
    python scripts/bench --algorithm metasgd --workload sinusoid --threads 1

    The baselines are optional (``pip install -e .[bench]``, see the README for the steps that
    build learn2learn on Python 3.11). A missing baseline is reported in one line and skipped.
    learn2learn imports torchvision at import time but its MAML never uses it; if torchvision is
    absent or cannot load (e.g. a CUDA torchvision wheel beside a CPU-only torch), a stand-in
    module is put in its place so that ``import learn2learn`` succeeds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the `bench` package
if importlib.util.find_spec("maml_runner") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.baselines import (  # noqa: E402
    BASELINES,
    COUNTERPARTS,
    INSTALL_HINT,
    import_library,
    unsupported,
)
from bench.harness import (  # noqa: E402
    BUSY_CORES,
    GRAD_RTOL,
    OURS,
    Budget,
    Result,
    WorkerError,
    benchmark,
    check_gradients,
    resolve_tasks_per_pass,
    warn_if_busy,
)
from bench.workloads import (  # noqa: E402
    ALGORITHMS,
    DEFAULT_WORKLOADS,
    OUTER_LR,
    WORKLOADS,
    Workload,
    batched,
)

LIBRARIES = ("ours", "general", "learn2learn", "higher")

# -------------------------------------------------------------------------------------- output


def print_table(results: dict[str, Result], fixed_iters: bool) -> None:
    base = results.get("learn2learn")
    same_iters = fixed_iters and len({r.iters for r in results.values()}) == 1
    loss_head = f" {'final loss':>11}" if same_iters else ""
    print(f"{'library':<12} {'it/s':>9} {'vs l2l':>8} {'iters':>6} {'peak MiB':>9}{loss_head}")
    for name, r in results.items():
        ratio = f"{r.rate / base.rate:7.2f}x" if base else f"{'-':>8}"
        loss = f" {r.final_loss:>11.4f}" if same_iters else ""
        print(
            f"{name:<12} {_rate(r.rate):>9} {ratio} {r.iters:>6} {r.peak_bytes / 2**20:>9.1f}{loss}"
        )
    if same_iters:
        print("(final loss: query loss after adaptation from each library's trained weights)")


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}" if rate >= 1 else f"{rate:.3f}"


def print_summary(all_results: dict[str, dict[str, Result]], disturbed: list[str]) -> None:
    libraries = [name for name in LIBRARIES if any(name in r for r in all_results.values())]
    head = "".join(f" {name + ' it/s':>16}" for name in libraries)
    head += f" {'ours/l2l':>9}" + (f" {'general/ours':>12}" if "general" in libraries else "")
    print(f"\n{'summary':<18}{head}  peak MiB ({', '.join(libraries)})")
    for workload, results in all_results.items():
        rates = "".join(
            f" {_rate(results[n].rate) if n in results else '-':>16}" for n in libraries
        )
        base = results.get("learn2learn")
        ratio = f"{results['ours'].rate / base.rate:8.2f}x" if base else f"{'-':>9}"
        if "general" in libraries:
            general = results.get("general")
            ratio += f" {general.rate / results['ours'].rate:11.2f}x" if general else f" {'-':>12}"
        peaks = ", ".join(f"{results[n].peak_bytes / 2**20:.0f}" for n in results)
        mark = "*" if workload in disturbed else ""
        print(f"{workload + mark:<18}{rates} {ratio}  {peaks}")
    if disturbed:
        print("(*: timed while other processes used the CPUs)")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------- main


def _workload_names(values: list[str] | None, parser: argparse.ArgumentParser) -> list[str]:
    if not values:
        return list(DEFAULT_WORKLOADS)
    names: list[str] = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name == "all":
                names.extend(WORKLOADS)
            elif name not in WORKLOADS:
                parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, all")
            else:
                names.append(name)
    return list(dict.fromkeys(names))  # in order, once each


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"repeatable or comma-separated: {', '.join(WORKLOADS)} or all (default: "
        f"{', '.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    parser.add_argument(
        "--iters",
        type=int,
        help="time this many meta-iterations per library on every workload (default: 1000 on "
        "the sinusoid; the image workloads are timed for --seconds)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="time each library for this long on every workload (default: 25 on CPU, 10 on "
        "CUDA, for the image workloads)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed meta-iterations first (default: 20 on the sinusoid; 1 on the image "
        "workloads, 3 on CUDA)",
    )
    parser.add_argument(
        "--rounds", type=int, help="turns the libraries take (default 4, with --quick 1)"
    )
    parser.add_argument(
        "--algorithm",
        choices=list(ALGORITHMS),
        default="maml",
        help="the learner ours runs, timed against learn2learn's counterpart where it has one "
        "(default: maml, against learn2learn and higher)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ours"], help="time only maml-runner")
    parser.add_argument(
        "--general-path",
        action="store_true",
        help="also time ours with the model forced onto the torch.func path (row 'general'), "
        "on the workloads whose model the batched layers cover",
    )
    parser.add_argument(
        "--malloc",
        choices=["ours", "all"],
        default="ours",
        help="whose process keeps freed memory (maml_runner.memory.keep_freed_memory): ours, as "
        "maml-run does (default), or every library's, to compare with that tuning alike",
    )
    parser.add_argument(
        "--tasks-per-pass",
        default="auto",
        help="ours: tasks per forward/backward pass, as trainer.tasks_per_pass (default: auto)",
    )
    args = parser.parse_args(argv)
    args.workloads = _workload_names(args.workload, parser)
    if args.tasks_per_pass == "auto":
        args.tasks_per_pass = None
    elif not args.tasks_per_pass.isdigit() or int(args.tasks_per_pass) < 1:
        parser.error(f"--tasks-per-pass {args.tasks_per_pass}: give a number >= 1, or auto")
    else:
        args.tasks_per_pass = int(args.tasks_per_pass)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.iters is not None and args.seconds is not None:
        parser.error("--iters and --seconds exclude each other")
    if (
        (args.iters is not None and args.iters < 1)
        or (args.seconds is not None and args.seconds <= 0)
        or (args.warmup is not None and args.warmup < 0)
        or (args.rounds is not None and args.rounds < 1)
        or args.threads < 1
    ):
        parser.error("--iters, --rounds and --threads must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def libs_for(workload: Workload, libs: dict[str, Any], algorithm: str = "maml") -> dict[str, Any]:
    """The libraries to time on ``workload``: no 'general' row where ours is that path already,
    no baseline without a counterpart of ``algorithm`` on it (``baselines.unsupported``)."""
    return {
        n: lib
        for n, lib in libs.items()
        if (n != "general" or batched(workload))
        and (n in OURS or unsupported(algorithm, n, workload) is None)
    }


def print_missing(workload: Workload, libs: dict[str, Any], algorithm: str, indent: str) -> None:
    """One line per selected baseline that has no counterpart of ``algorithm`` on ``workload``."""
    for name in libs:
        reason = None if name in OURS else unsupported(algorithm, name, workload)
        if reason:
            print(f"{indent}{name}: not timed on {workload.name}: {reason}")


def budget_for(workload: Workload, args: argparse.Namespace) -> Budget:
    """The workload's defaults, scaled down by ``--quick``, overridden by explicit options."""
    cuda = args.device == "cuda"
    if workload.iters is not None:  # a fixed number of meta-iterations
        iters: int | None = workload.iters // 10 if args.quick else workload.iters
        warmup = workload.warmup // 4 if args.quick else workload.warmup
    else:  # a fixed time
        iters = None
        warmup = 0 if args.quick else 3 if cuda else workload.warmup
    if args.iters is not None:
        iters = args.iters
    elif args.seconds is not None:
        iters = None
    seconds = args.seconds or (1e-3 if args.quick else 10.0 if cuda else 25.0)
    rounds = args.rounds or (1 if args.quick else 4)
    warmup = warmup if args.warmup is None else args.warmup
    return Budget(iters, seconds, warmup, min(rounds, iters) if iters else rounds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    libs: dict[str, Any] = {"ours": None}
    if args.general_path:
        libs["general"] = None
    algorithm, label = args.algorithm, ALGORITHMS[args.algorithm]
    baselines = list(BASELINES[algorithm])  # the libraries with a counterpart of the algorithm
    if args.only == "ours":
        print(f"--only ours: skipping {' and '.join(baselines)} (for them: {INSTALL_HINT})")
    else:
        if algorithm != "maml":
            absent = [n for n in ("learn2learn", "higher") if n not in baselines]
            print(f"{label}: {', '.join(absent)} has no counterpart; not timed")
        for name in baselines:
            lib, note = import_library(name)
            if note:
                print(note)
            if lib is not None:
                libs[name] = lib

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"second-order {label}, Adam {OUTER_LR:g} outer; torch {torch.__version__} on {where}, "
        f"{torch.get_num_threads()} threads"
    )
    versions = [f"{name} {_version(name)}" for name in libs if name not in OURS]
    if versions:
        print("baselines: " + ", ".join(versions))
    if algorithm != "maml" and len(libs) > 1:
        print(COUNTERPARTS[algorithm])

    warn_if_busy()
    if args.quick:
        print("--quick: a smoke run; its timings are rough (1 cold meta-iteration of image work)")

    if len(libs) > 1:
        of = {"metasgd": " of θ and α", "mamlpp": " of θ and the rates", "anil": " of θ"}
        print(f"\nfloat64 meta-gradient{of.get(algorithm, '')}, max relative difference vs ours:")
        ok = True  # the baselines' meta-gradients agree with ours
        for name in args.workloads:
            workload = WORKLOADS[name]
            tasks = 1 if args.quick else workload.check_tasks
            per_pass = resolve_tasks_per_pass(workload, args)
            compared = libs_for(workload, libs, algorithm)
            diffs = (  # nothing to compute where ours has no baseline on the workload
                check_gradients(workload, compared, device, args.seed, tasks, per_pass, algorithm)
                if len(compared) > 1
                else {}
            )
            cells = []
            for lib_name, diff in diffs.items():
                verdict = "ok" if diff <= GRAD_RTOL else f"MISMATCH (> {GRAD_RTOL:g})"
                cells.append(f"{lib_name} {diff:.2e} {verdict}")
                ok = ok and diff <= GRAD_RTOL
            checked = f"{name} ({tasks} task{'s' if tasks > 1 else ''})"
            print(f"  {checked:<28} " + "   ".join(cells or ["(no baseline to compare)"]))
            print_missing(workload, libs, algorithm, "    ")
        if not ok:
            print("ERROR: meta-gradients disagree with ours; not timing", file=sys.stderr)
            return 1

    all_results: dict[str, dict[str, Result]] = {}
    disturbed: list[str] = []  # workloads timed while other processes used the CPUs
    for name in args.workloads:
        workload = WORKLOADS[name]
        budget = budget_for(workload, args)
        print(f"\n== {name}: {workload.summary}")
        per_pass = resolve_tasks_per_pass(workload, args)
        how = "--tasks-per-pass" if args.tasks_per_pass else "auto"
        print(f"ours: passes of {per_pass} tasks ({how})")
        print_missing(workload, libs, algorithm, "")
        print(f"timing {budget.describe()}...")
        try:
            results, others = benchmark(
                workload, list(libs_for(workload, libs, algorithm)), budget, args, per_pass
            )
        except WorkerError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 2
        print_table(results, budget.iters is not None)
        if others is not None and others > BUSY_CORES:
            disturbed.append(name)
            print(
                f"WARNING: other processes kept {others:.1f} of {os.cpu_count()} CPU cores busy "
                "while timing: these numbers are low and unreliable"
            )
        all_results[name] = results

    print_summary(all_results, disturbed)
    memory = "peak RSS above RSS" if device.type == "cpu" else "peak above allocated memory"
    print(f"(peak MiB: {memory} in each library's own process, from when weights, data and")
    print(" optimizer had been built)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
