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

WORKLOADS = ("sinusoid", "omniglot-5w1s")


def test_quick_bench_of_ours_prints_a_rate_for_every_workload() -> None:
    command = [sys.executable, str(REPO / "scripts" / "bench"), "--quick", "--only", "ours"]
    command += ["--workload", ",".join(WORKLOADS), "--threads", "1"]
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
    assert set(rows) == set(WORKLOADS), out
    for name, (rate, _peak_mib) in rows.items():
        assert math.isfinite(rate) and rate > 0, (name, out)
    # --quick times 100 sinusoid meta-iterations and 1 of an image workload
    sinusoid_table = out[out.index("== sinusoid") : out.index("== omniglot-5w1s")]
    assert re.search(r"^ours\s+[0-9.]+\s+-\s+100\s", sinusoid_table, re.M), sinusoid_table
    omniglot_table = out[out.index("== omniglot-5w1s") : out.index("\nsummary")]
    assert re.search(r"^ours\s+[0-9.]+\s+-\s+1\s", omniglot_table, re.M), omniglot_table
