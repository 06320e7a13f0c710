"""The GPU check's dry run (``scripts/gpu_check.sh --dry-run``): every step on CPU, tiny sizes.

It installs higher into a temporary folder, runs the bench against it, warms up the Omniglot
5-way 1-shot preset, resumes it and meta-tests it; the test reads what it wrote under ``$OUT``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import CACHE, OMNIGLOT, REPO

BASELINES = REPO.parent / "shared" / "device" / "baselines"


@pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file(),
    reason=f"the Omniglot zips are not in {OMNIGLOT}",
)
@pytest.mark.skipif(
    not any(BASELINES.glob("higher-*.whl")), reason=f"no higher wheel in {BASELINES}"
)
def test_dry_run_writes_the_bench_the_run_and_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": path}
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"]
    command += ["--cache-dir", str(CACHE)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    bench = (out / "bench.txt").read_text()
    # (learn2learn joins the row where it is installed; the dry run installs only higher)
    assert re.search(r"sinusoid \(1 task\)\s+(learn2learn \S+ ok\s+)?higher \S+ ok", bench), bench
    rates = re.search(r"^sinusoid\*?\s+([0-9.]+)\s+([0-9.]+)\s", bench, re.M)
    assert rates and float(rates[1]) > 0 and float(rates[2]) > 0, bench  # ours, higher

    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 4  # 2 of warm-up, resumed to 2 x 2
    assert summary["meta_test_tasks"] == 4 and summary["inner_steps"] == 3
    assert 0 <= summary["query_acc_pct"] <= 100 and summary["query_acc_ci95_pct"] >= 0
    run = out / "omniglot_5w1s"
    assert (run / "checkpoints" / "last.pt").is_file()
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 4
    assert "resuming from" in (out / "omniglot_run.log").read_text()

    log = (out / "gpu_check.txt").read_text()
    assert log in done.stdout or all(line in done.stdout for line in log.splitlines())
    figures = (
        f"Omniglot 5-way 1-shot, 4 iterations, 4 test tasks, 3 inner steps: "
        f"{summary['query_acc_pct']:.1f} ± {summary['query_acc_ci95_pct']:.1f}% "
        f"(paper: 98.7 ± 0.4%), run wall time {summary['wall_s']:.0f} s"
    )
    assert figures in log, log
