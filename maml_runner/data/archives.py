"""Dataset archives: checksums, ``sha256sum -c`` files and atomic, md5-checked downloads.

Nothing here knows about a particular dataset; ``maml_runner.data.omniglot`` builds on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

from maml_runner.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 1 << 20


def _digest(path: str | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256sum(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    return _digest(path, "sha256")


def md5sum(path: str | Path) -> str:
    """Hex MD5 of a file (the checksum the official Omniglot archives are published with)."""
    return _digest(path, "md5")


def read_checksum_file(path: str | Path) -> dict[str, str]:
    """Parse a ``sha256sum``/``md5sum`` output file into ``{file name: lower-case hex digest}``.

    Lines are ``<hex>  <name>`` (text mode) or ``<hex> *<name>`` (binary mode); blank lines and
    ``#`` comments are skipped. A line of any other shape raises ``UserError`` naming the file
    and the line number.
    """
    path = Path(path)
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or not name or not all(c in "0123456789abcdefABCDEF" for c in digest):
            raise UserError(
                f"{path}: line {number} is not '<hex digest>  <file name>' (sha256sum format)"
            )
        sums[name] = digest.lower()
    return sums


@contextmanager
def atomic_file(dest: Path) -> Iterator[object]:
    """Yield a binary file beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_cache(path: Path, state: dict, fmt: int) -> bool:
    """``torch.save`` ``state`` (tagged with format ``fmt``) to ``path`` atomically.

    The cache only saves time: a folder that cannot be written (read-only, below a file, full)
    prints one warning line, leaves nothing half-written, and the caller continues with the data
    it decoded. Returns whether the cache was written.
    """
    try:
        with atomic_file(path) as f:
            torch.save({**state, "format": fmt}, f)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's writer on a failed write
        reason = os_reason(e, known=path.parent)
        warn(f"cannot write the decoded cache to {path.parent} ({reason}); continuing without it")
        return False
    return True


def warn(message: str) -> None:
    """Print ``warning: message`` as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def os_reason(err: BaseException, known: Path) -> str:
    """The errno text of the ``OSError`` behind ``err`` (torch hides it), else its first line;
    the file the error names is added unless it is ``known`` or in it (the message names it)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            text = seen.strerror[:1].lower() + seen.strerror[1:]
            named = seen.filename and known not in (Path(seen.filename), Path(seen.filename).parent)
            return f"{text}: {seen.filename}" if named else text
        seen = seen.__cause__ or seen.__context__
    lines = str(err).splitlines()
    return lines[0][:160] if lines else type(err).__name__


def read_cache(path: Path, fmt: int, parse: Callable[[dict], T], name: str) -> T | None:
    """``parse(state)`` of a ``write_cache`` file, or ``None`` when it is absent, unreadable,
    of another format, or ``parse`` rejects it (the caller then rebuilds it)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != fmt:
            raise ValueError(f"format {state.get('format')}, expected {fmt}")
        return parse(state)
    except Exception as e:  # any unreadable cache is rebuilt
        log.warning("rebuilding the %s cache %s (%s)", name, path, e)
        return None


def _progress(total: int | None, label: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """An ``(advance, close)`` pair: a rich progress bar on a terminal, no-ops otherwise."""
    if not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    progress.start()
    task = progress.add_task(label, total=total)
    return (lambda n: progress.advance(task, n)), progress.stop


def download(url: str, dest: str | Path, md5: str | None = None, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` (``http(s)://`` or ``file://``) to ``dest`` atomically; check its md5.

    The bytes go to a temporary file beside ``dest``, renamed onto it only once complete and
    (when ``md5`` is given) verified, so an interrupted or bad download never leaves a partial
    ``dest``. A progress bar is shown when stderr is a terminal.

    Args:
        url: where to fetch from.
        dest: the file to create (parent folders are made).
        md5: expected hex MD5 of the file; ``None`` skips the check.
        timeout: socket timeout in seconds.

    Returns:
        ``dest`` as a ``Path``.

    Raises:
        UserError: the download failed, or the md5 differs (the message names the file, the
            expected and the actual digest).
    """
    dest = Path(dest)
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_file(dest) as f:
            length = response.headers.get("Content-Length")
            advance, close = _progress(int(length) if length else None, dest.name)
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)  # type: ignore[attr-defined]
                    h.update(block)
                    advance(len(block))
            finally:
                close()
            if md5 is not None and h.hexdigest() != md5.lower():
                raise UserError(
                    f"{dest.name} downloaded from {url}: md5 mismatch (expected {md5.lower()}, "
                    f"got {h.hexdigest()}); the file was not kept"
                )
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"{url}: download of {dest.name} failed ({reason})") from None
    return dest
