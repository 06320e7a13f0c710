"""W&B online mode without a server or a login: one line or an offline run, never a traceback.

Each test runs a real ``Tracker(mode="online")`` with real wandb in a fresh process (wandb reads
its environment once per process), pointed only at loopback addresses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DUMMY_KEY = "0123456789012345678901234567890123456789"

CHILD = """
import json, sys, time
from pathlib import Path
from maml_runner.errors import UserError
from maml_runner.tracking import Tracker

start = time.perf_counter()
try:
    tracker = Tracker(Path(sys.argv[1]), mode="online", project="p", config={"seed": 0})
except UserError as err:
    print(json.dumps({"error": str(err)}))
    raise SystemExit(2)
init_s = time.perf_counter() - start
tracker.log({"meta_train/query_loss": 0.5}, step=1)
tracker.summary({"meta_test/query_loss": 0.25})
wandb_dir = tracker.wandb_dir
tracker.close()
print(json.dumps({"init_s": init_s, "wandb_dir": wandb_dir}))
"""


def _online(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run CHILD with a clean W&B environment (no login, no proxy) plus ``env``."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WANDB_") and "proxy" not in k.lower()
    }
    home = tmp_path / "home"
    home.mkdir()
    clean.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"), **env)
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [clean.get("PYTHONPATH")])])
    # wandb's own error reports go to its servers (and stall the exit ~20 s without a network)
    clean["WANDB_ERROR_REPORTING"] = "false"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "run")],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_fell_back_offline(done: subprocess.CompletedProcess[str], out: dict) -> None:
    assert done.returncode == 0, done.stderr
    offline = Path(out["wandb_dir"])
    assert offline.name.startswith("offline-run-"), offline
    assert b"meta_train/query_loss" in next(offline.glob("run-*.wandb")).read_bytes()
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert f"`wandb sync {offline}`" in warnings[0], warnings[0]


def test_online_with_an_unreachable_server_falls_back_to_offline_at_once(tmp_path: Path) -> None:
    port = _closed_port()
    done, out = _online(
        tmp_path, WANDB_API_KEY=DUMMY_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{port}"
    )
    _assert_fell_back_offline(done, out)
    assert f"cannot reach 127.0.0.1:{port}" in done.stderr
    assert out["init_s"] < 10, out


def test_online_with_a_silent_server_falls_back_after_init_timeout(tmp_path: Path) -> None:
    with socket.socket() as server:  # accepts connections (the kernel's backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        done, out = _online(
            tmp_path,
            WANDB_API_KEY=DUMMY_KEY,
            WANDB_BASE_URL=f"http://127.0.0.1:{port}",
            WANDB_INIT_TIMEOUT="3",
        )
    _assert_fell_back_offline(done, out)
    assert "wandb.init failed" in done.stderr, done.stderr
    assert 3 <= out["init_s"] < 15, out


def test_online_without_a_login_is_one_line(tmp_path: Path) -> None:
    port = _closed_port()  # the login is checked first, whatever the network
    done, out = _online(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    assert done.returncode == 2, done.stderr
    assert out["error"] == (
        "logger.mode=online needs a W&B login: run `wandb login` (or set WANDB_API_KEY), "
        "or use logger.mode=offline (the default) and `wandb sync` later"
    )
    assert not (tmp_path / "run" / "wandb").exists()
