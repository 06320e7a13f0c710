"""The bench's quick mode, ours alone (``python scripts/bench --quick --only ours``), end to end.

It spawns a worker per workload and prints a table per workload and a summary; the test reads
the summary's it/s column, so a broken harness, a changed format or a worker that timed nothing
fails here (CI also runs the same command, see ``.ci/run``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from tests.helpers import REPO

QUICK_WORKLOADS = ("sinusoid", "omniglot-5w1s")


def test_quick_bench_of_ours_prints_a_rate_for_every_workload() -> None:
    command = [sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--only", "ours"]
    command += ["--workload", ",".join(QUICK_WORKLOADS), "--threads", "1"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's maml_runner, not another one
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "--only ours: skipping learn2learn and higher" in out
    summary = out[out.index("\nsummary") :].splitlines()[1:]
    rows = {}
    for line in summary:
        match = re.fullmatch(r"(\S+?)\*?\s+([0-9.]+)\s+-\s+(\d+)", line)
        if match:
            rows[match[1]] = (float(match[2]), int(match[3]))
    assert set(rows) == set(QUICK_WORKLOADS), out
    for name, (rate, _peak_mib) in rows.items():
        assert math.isfinite(rate) and rate > 0, (name, out)
    # --quick times 100 sinusoid meta-iterations and 1 of an image workload
    sinusoid_table = out[out.index("== sinusoid") : out.index("== omniglot-5w1s")]
    assert re.search(r"^ours\s+[0-9.]+\s+-\s+100\s", sinusoid_table, re.M), sinusoid_table
    omniglot_table = out[out.index("== omniglot-5w1s") : out.index("\nsummary")]
    assert re.search(r"^ours\s+[0-9.]+\s+-\s+1\s", omniglot_table, re.M), omniglot_table


# ------------------------------------------------------------------- --algorithm (issue 13)

sys.path.insert(0, str(REPO / "scripts"))  # the `bench` package

import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from bench.baselines import BASELINES, import_library, unsupported  # noqa: E402
from bench.harness import GRAD_RTOL, check_gradients, make_runner  # noqa: E402
from bench.workloads import WORKLOADS, Runner, Workload, first_tasks, to_device  # noqa: E402

from maml_runner.models import Conv4  # noqa: E402

FAMILY = ("metasgd", "anil", "mamlpp")
CPU = torch.device("cpu")


def _learn2learn() -> object:
    l2l, _ = import_library("learn2learn")
    if l2l is None:
        pytest.skip("learn2learn is not installed (pip install -e .[bench])")
    return l2l


def _tiny(name: str) -> tuple[Workload, int]:
    """A workload small enough for a test, with several inner steps (MAML++'s steps differ)."""
    if name == "sinusoid":
        return dataclasses.replace(WORKLOADS["sinusoid"], inner_steps=3), 4
    narrow = dataclasses.replace(  # batch norm, 2 inner steps, 8 filters
        WORKLOADS["omniglot-5w1s"], build_model=lambda: Conv4(1, 28, 5, filters=8), inner_steps=2
    )
    return narrow, 2


@pytest.mark.parametrize("workload_name", ["sinusoid", "conv"])
@pytest.mark.parametrize("algorithm", FAMILY)
def test_family_meta_gradients_agree_with_learn2learn(algorithm: str, workload_name: str) -> None:
    """θ's and the learned rates' float64 meta-gradients: ours vs learn2learn's counterpart."""
    libs = {"ours": None, "learn2learn": _learn2learn()}
    workload, tasks = _tiny(workload_name)
    diff = check_gradients(workload, libs, CPU, 0, tasks, tasks, algorithm)["learn2learn"]
    assert diff < 1e-8, (algorithm, workload_name, diff)


@pytest.mark.parametrize("algorithm", FAMILY)
def test_family_meta_steps_move_the_same_meta_parameters_as_learn2learn(algorithm: str) -> None:
    """Five timed meta-steps in float64: θ and the learned rates stay together, so both outer
    optimisers step the same meta-parameters (a rate left out of one would drift apart)."""
    l2l = _learn2learn()
    workload, tasks = _tiny("sinusoid")
    init, batch = workload.build(0)
    batch = to_device(first_tasks(batch, tasks), CPU, torch.float64)
    runners = [
        make_runner(name, workload, lib, copy.deepcopy(init).double(), tasks, algorithm)
        for name, lib in (("ours", None), ("learn2learn", l2l))
    ]
    for _ in range(5):
        for runner in runners:
            runner.step(batch)
    ours, theirs = (runner.params for runner in runners)
    assert len(ours) == len(theirs) == 6 + len(runners[0].learned)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _perturbed(algorithm: str) -> object:
    """learn2learn's counterpart with its first learned rate tensor 1% off (as a wrong init)."""
    make = BASELINES[algorithm]["learn2learn"]

    def perturbed(workload: Workload, l2l: object, model: torch.nn.Module) -> Runner:
        runner = make(workload, l2l, model)
        with torch.no_grad():
            next(iter(runner.learned.values())).mul_(1.01)
        return runner

    return perturbed


@pytest.mark.parametrize("algorithm", ["metasgd", "mamlpp"])
def test_the_gradient_check_sees_a_perturbed_learned_rate(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    libs = {"ours": None, "learn2learn": _learn2learn()}
    monkeypatch.setitem(BASELINES[algorithm], "learn2learn", _perturbed(algorithm))
    workload, tasks = _tiny("sinusoid")
    diff = check_gradients(workload, libs, CPU, 0, tasks, tasks, algorithm)["learn2learn"]
    assert diff > GRAD_RTOL, diff


def test_the_bench_refuses_to_time_a_pair_that_disagrees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _learn2learn()
    monkeypatch.setitem(BASELINES["metasgd"], "learn2learn", _perturbed("metasgd"))
    bench = importlib.import_module("bench.__main__")
    threads = torch.get_num_threads()
    try:
        argv = ["--algorithm", "metasgd", "--workload", "sinusoid", "--quick", "--threads", "1"]
        status = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert re.search(r"sinusoid \(1 task\)\s+learn2learn \S+ MISMATCH", out), out
    assert "not timing" in err and "== sinusoid" not in out, out + err


def test_anil_has_no_learn2learn_counterpart_on_resnet12() -> None:
    """learn2learn's ANIL pattern needs body and head apart: MLP and Conv4 have them."""
    assert unsupported("anil", "learn2learn", WORKLOADS["sinusoid"]) is None
    assert unsupported("anil", "learn2learn", WORKLOADS["omniglot-5w1s"]) is None
    reason = unsupported("anil", "learn2learn", WORKLOADS["resnet12-narrow-5w1s"])
    assert reason is not None and "ResNet12" in reason
    assert unsupported("metasgd", "learn2learn", WORKLOADS["resnet12-narrow-5w1s"]) is None


def test_quick_bench_of_metasgd_times_ours_and_learn2learn() -> None:
    _learn2learn()
    command = [sys.executable, str(REPO / "scripts" / "bench"), "--algorithm", "metasgd"]
    command += ["--quick", "--workload", "sinusoid", "--threads", "1", "--iters", "10"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Meta-SGD: higher has no counterpart; not timed" in out, out
    assert "second-order Meta-SGD, Adam 0.001 outer" in out, out
    assert re.search(r"sinusoid \(1 task\)\s+learn2learn \S+ ok", out), out
    for name in ("ours", "learn2learn"):
        assert re.search(rf"^{name}\s+[0-9.]+\s+[0-9.]+x\s+10\s", out, re.M), out
    assert not re.search(r"^higher\s", out, re.M), out
