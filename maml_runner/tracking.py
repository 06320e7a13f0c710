"""Experiment tracking: a JSONL history always, and one Weights & Biases run per job.

The only module that imports ``wandb``. ``mode=offline`` (the default) needs no account and no
network; ``wandb sync <run folder>/wandb/offline-run-*`` uploads later. ``mode=online`` without a
W&B login stops at once with one line; with a login but no reachable server (a TCP connect to the
configured host, or its proxy, within ``CONNECT_TIMEOUT_S``; then ``wandb.init`` within
``INIT_TIMEOUT_S``) the run falls back to offline with one warning line and never loses the run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from maml_runner.errors import UserError

HISTORY = "metrics.jsonl"
# seconds a TCP connect to the W&B host (or its proxy) may take before the run goes offline
CONNECT_TIMEOUT_S = 3.0
# seconds wandb.init may take online once the host answered (wandb's default is 90 s);
# WANDB_INIT_TIMEOUT, when set, wins
INIT_TIMEOUT_S = 30.0


class Tracker:
    """Log scalars, images and a summary for one job.

    Args:
        run_dir: the job's output folder; the history and the W&B files go there.
        mode: ``online`` | ``offline`` | ``disabled`` (W&B only; the JSONL is always written).
        config: the resolved config, logged to W&B.
        run_id: reuse a W&B run id (resuming a job continues its W&B run).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        mode: str,
        project: str,
        config: dict[str, Any],
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._history = open(self.run_dir / HISTORY, "a", buffering=1)
        self._run = None
        if mode != "disabled":
            try:
                self._run = _start_wandb(
                    mode,
                    project=project,
                    entity=entity,
                    group=group,
                    tags=tags or None,
                    name=name,
                    config=config,
                    dir=str(self.run_dir),
                    id=run_id,
                    resume="allow" if run_id else None,
                )
            except BaseException:
                self._history.close()
                raise

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

    @property
    def wandb_dir(self) -> str | None:
        return None if self._run is None else str(Path(self._run.dir).parent)

    def log(self, metrics: dict[str, float], step: int, train_time: float | None = None) -> None:
        """Record scalars at ``step`` (keys ``split/quantity``); ``train_time``: the seconds the
        run has trained so far, across resumes (the history's ``train_time_s``, not sent to W&B,
        which keeps its own clock)."""
        row = {"step": step, "time": round(time.time(), 3)}
        if train_time is not None:
            row["train_time_s"] = round(train_time, 3)
        row.update({k: _json_number(v) for k, v in metrics.items()})
        self._history.write(json.dumps(row) + "\n")
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self._run is not None:
            import wandb

            self._run.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; always called (``finally``), also when the job fails."""
        self._history.close()
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # never mask the job's own error in a ``finally``
                _warn(f"closing the W&B run in {Path(run.dir).parent} failed: {_one_line(err)}")


class NullTracker:
    """Records nothing: torchrun's ranks other than 0 (rank 0 keeps the history and W&B run)."""

    run_id = None
    wandb_dir = None

    def log(self, metrics: dict[str, float], step: int, train_time: float | None = None) -> None:
        pass

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


def keep_history_until(run_dir: Path, step: int) -> int:
    """On resume from ``step``: drop the history rows logged after it (by a run that went on
    past its last checkpoint and was then killed), so that no step is in the history twice.

    Returns how many rows were dropped; the file is replaced atomically.
    """
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return 0
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) < len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)


def _json_number(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


_LOGIN = (
    "run `wandb login` (or set WANDB_API_KEY), "
    "or use logger.mode=offline (the default) and `wandb sync` later"
)


def _start_wandb(mode: str, **init: Any) -> Any:
    """``wandb.init`` in ``mode``; online goes offline, with one warning, when the server is away.

    Raises:
        UserError: ``mode=online`` without a usable W&B login (found without a prompt).
    """
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    quiet = {"console": "off", "quiet": True}
    if mode != "online":
        return wandb.init(mode=mode, **init, settings=wandb.Settings(**quiet))
    reason = _unreachable(wandb)
    if reason is None:
        timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": INIT_TIMEOUT_S}
        try:
            return wandb.init(mode="online", **init, settings=wandb.Settings(**quiet, **timeout))
        except (wandb.errors.AuthenticationError, wandb.errors.UsageError) as err:
            raise UserError(
                f"logger.mode=online: W&B refused the login ({_one_line(err)}); {_LOGIN}"
            ) from None
        except Exception as err:  # CommError, timeouts: wandb names no narrower base
            reason = f"wandb.init failed ({_one_line(err)})"
    run = wandb.init(mode="offline", **init, settings=wandb.Settings(**quiet))
    offline = Path(run.dir).parent
    _warn(
        f"W&B online is unavailable: {reason}; logging offline to {offline}; "
        f"upload later with `wandb sync {offline}`"
    )
    return run


def _unreachable(wandb: Any) -> str | None:
    """Why the W&B server is out of reach, or ``None``; no login raises ``UserError``.

    The key is looked up without a prompt and without the network (env, ``~/.netrc``, settings);
    the only connection tried is a TCP connect to the configured base URL's host, or to the proxy
    that ``HTTPS_PROXY``/``HTTP_PROXY`` name for it, within ``CONNECT_TIMEOUT_S``.
    """
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except Exception as err:  # AuthenticationError: a key in a malformed format
        raise UserError(
            f"logger.mode=online: the W&B API key is unusable ({_one_line(err)}); {_LOGIN}"
        ) from None
    if not logged_in:
        raise UserError(f"logger.mode=online needs a W&B login: {_LOGIN}")
    base_url = wandb.setup().settings.base_url
    url = urlsplit(base_url)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = (
        None if urllib.request.proxy_bypass(host) else urllib.request.getproxies().get(url.scheme)
    )
    if proxy:
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or "", via.port or 80
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"cannot reach {host}:{port} for {base_url} ({_one_line(err)})"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
