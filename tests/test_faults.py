"""Disk and cache faults: a full disk while checkpointing, a cache folder that cannot be written,
a corrupt member inside an archive. Each fault is real (a filesystem that fills up, a folder that
cannot be created, a damaged deflate stream), not a mock.

Mounting needs root with CAP_SYS_ADMIN; where that is not available those cases skip and say so,
and the cases that need no privileges still run (``/dev/full``, a cache folder below a file).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from maml_runner import checkpoint
from maml_runner.errors import UserError


def _mount(args: list[str], target: Path) -> str | None:
    """Run ``mount ARGS TARGET``; ``None`` on success, else why it could not be done."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a filesystem needs root and mount(8)"
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"mount {' '.join(args)} failed here: {proc.stderr.strip() or proc.returncode}"
    return None


def _umount(target: Path) -> None:
    # lazy: a file left open (the failure of an older save did that) must not keep it mounted
    subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, so that a real write fills it up."""
    target = tmp_path / "tiny"
    why = _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], target)
    if why:
        pytest.skip(why)
    try:
        yield target
    finally:
        _umount(target)


# --- (a) a full disk while writing a checkpoint ---------------------------------------------


def _save(path: Path, width: int, step: int) -> Path:
    model = nn.Linear(width, width)
    optimizer = torch.optim.Adam(model.parameters())
    return checkpoint.save(path, model=model, optimizer=optimizer, step=step, config={"k": 1})


def test_full_disk_keeps_the_previous_checkpoint(tiny_fs: Path) -> None:
    last = tiny_fs / "checkpoints" / checkpoint.LAST
    _save(last, 4, step=1)  # ~2 KB: fits
    before = last.read_bytes()
    with pytest.raises(UserError) as err:
        _save(last, 200, step=2)  # 40k weights, about 160 KB: does not fit
    message = str(err.value)
    assert message.startswith(f"no space left on device while writing {last}; ")
    assert "previous last.pt is unchanged" in message and "\n" not in message
    assert last.read_bytes() == before
    assert checkpoint.load(last)["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == [checkpoint.LAST]  # no last.pt.tmp


def test_full_disk_on_dev_full(tmp_path: Path) -> None:
    """Without mounting: the temporary file is a link to ``/dev/full`` (every write: ENOSPC)."""
    if not Path("/dev/full").exists() or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full character device here")
    last = tmp_path / checkpoint.LAST
    tmp = last.with_name(last.name + ".tmp")  # the name save writes to before renaming
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"^no space left on device while writing .*nothing was"):
        _save(last, 4, step=1)
    assert list(tmp_path.iterdir()) == []  # neither last.pt nor the link left behind
    _save(last, 4, step=1)
    before = last.read_bytes()
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match="the previous last.pt is unchanged: free some space"):
        _save(last, 4, step=2)
    assert last.read_bytes() == before and not tmp.is_symlink()


def test_checkpoint_round_trip_after_the_change(tmp_path: Path) -> None:
    """The in-memory serialisation writes the same loadable checkpoint as before."""
    path = _save(tmp_path / "c" / checkpoint.BEST, 3, step=7)
    state = checkpoint.load(path)
    assert state["step"] == 7 and state["config"] == {"k": 1}
    assert set(state["model"]) == {"weight", "bias"} and state["optimizer"]["state"] == {}
    assert sorted(p.name for p in path.parent.iterdir()) == [checkpoint.BEST]
