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
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from maml_runner import checkpoint
from maml_runner.data import archives
from maml_runner.data.miniimagenet import load_miniimagenet
from maml_runner.data.omniglot import ARCHIVES, BACKGROUND_ZIP, load_omniglot
from maml_runner.errors import UserError
from tests.helpers import CACHE, QUICK, maml_run, read_metrics
from tests.test_omniglot_data import _make_fake

MINI = CACHE / "miniimagenet"  # the small miniImageNet pickles of tests.helpers


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


def test_checkpointer_says_how_to_go_on(tiny_fs: Path) -> None:
    def checkpointer(run: Path, width: int) -> checkpoint.Checkpointer:
        return checkpoint.Checkpointer(run, nn.Linear(width, width), None, {}, None)

    first = tiny_fs / "first"
    with pytest.raises(UserError) as err:
        checkpointer(first, 200).save_best(20, {"value": 1.0}, 1.0)  # the first write: too big
    assert str(err.value) == (
        f"no space left on device while writing {first}/checkpoints/best.pt; nothing was "
        "written: free some space, then run again"
    )
    run = tiny_fs / "run"
    checkpointer(run, 4).save(20, None, 1.0)
    with pytest.raises(UserError) as err:
        checkpointer(run, 200).save(40, None, 2.0)
    assert str(err.value).endswith(
        f"/checkpoints/last.pt; the previous last.pt is unchanged: free some space, then "
        f"resume={run}"
    )
    assert checkpoint.load(run / "checkpoints" / checkpoint.LAST)["step"] == 20


def test_full_disk_on_dev_full(tmp_path: Path) -> None:
    """Without mounting: the temporary file is a link to ``/dev/full`` (every write: ENOSPC)."""
    if not Path("/dev/full").exists() or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full character device here")
    last = tmp_path / checkpoint.LAST
    tmp = last.with_name(last.name + ".tmp")  # the name save writes to before renaming
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match=r"^no space left .* writing .*; nothing was written: free"):
        _save(last, 4, step=1)
    assert list(tmp_path.iterdir()) == []  # neither last.pt nor the link left behind
    _save(last, 4, step=1)
    before = last.read_bytes()
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match="the previous last.pt is unchanged: free some space$"):
        _save(last, 4, step=2)
    assert last.read_bytes() == before and not tmp.is_symlink()


def test_a_plot_that_cannot_be_written_costs_no_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """adaptation.png on a full disk (a link to /dev/full): metrics.json is written, the plot
    failure is one warning line, and the run finishes."""
    if not Path("/dev/full").exists() or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full character device here")
    from maml_runner import app
    from tests.helpers import make_config

    (tmp_path / "adaptation.png").symlink_to("/dev/full")
    app.run(make_config(QUICK), tmp_path)
    assert read_metrics(tmp_path)["meta_test"]["query_loss"]["mean"]
    assert (
        f"warning: cannot write the plots to {tmp_path} (no space left" in capsys.readouterr().err
    )


def test_checkpoint_round_trip_after_the_change(tmp_path: Path) -> None:
    """The in-memory serialisation writes the same loadable checkpoint as before."""
    path = _save(tmp_path / "c" / checkpoint.BEST, 3, step=7)
    state = checkpoint.load(path)
    assert state["step"] == 7 and state["config"] == {"k": 1}
    assert set(state["model"]) == {"weight", "bias"} and state["optimizer"]["state"] == {}
    assert sorted(p.name for p in path.parent.iterdir()) == [checkpoint.BEST]


# --- (b) a decoded-data cache that cannot be written ------------------------------------------


@pytest.fixture(scope="module")
def fake_omniglot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The tiny Omniglot-like zips of ``test_omniglot_data`` and their md5s."""
    folder = tmp_path_factory.mktemp("fake_omniglot")
    return folder, _make_fake(folder)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing, empty folder that even root cannot write: a read-only bind mount."""
    source, target = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    why = _mount(["--bind", "-o", "ro", str(source)], target)
    if why:
        pytest.skip(why)
    try:
        if not os.statvfs(target).f_flag & os.ST_RDONLY:
            pytest.skip("mount --bind -o ro gave a writable mount here")
        yield target
    finally:
        _umount(target)


def _cache_dir(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A ``data.cache_dir`` that fails for root too, each in its own way."""
    if kind == "below_a_file":  # NotADirectoryError, no privileges needed
        (tmp_path / "a_file").write_text("not a folder")
        return tmp_path / "a_file" / "cache"
    if kind == "read_only":  # EROFS
        return request.getfixturevalue("read_only_dir")
    return request.getfixturevalue("tiny_fs")  # "full": ENOSPC while torch.save writes


EXPECTED_REASON = {
    "below_a_file": "not a directory",
    "read_only": "read-only file system",
    "full": "no space left on device",
}


@pytest.mark.parametrize("kind", ["below_a_file", "read_only", "full"])
def test_unwritable_cache_warns_and_continues(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    fake_omniglot: tuple[Path, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, md5s = fake_omniglot
    reference = load_omniglot(root, cache_dir=tmp_path / "good", md5s=md5s)
    capsys.readouterr()
    cache_dir = _cache_dir(kind, tmp_path, request)
    data = load_omniglot(root, cache_dir=cache_dir, md5s=md5s)  # 78 KB of images at 28 px
    assert torch.equal(data.images, reference.images)
    assert data.alphabets == reference.alphabets and data.character_ids == reference.character_ids
    err = capsys.readouterr().err
    assert err == (
        f"warning: cannot write the decoded cache to {cache_dir} ({EXPECTED_REASON[kind]}); "
        "continuing without it\n"
    )
    assert not cache_dir.is_dir() or list(cache_dir.iterdir()) == []  # no half-written file


def test_unwritable_miniimagenet_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    cache_dir = tmp_path / "a_file" / "cache"
    splits = load_miniimagenet(MINI, cache_dir=cache_dir, image_size=16)
    assert {k: tuple(v.shape) for k, v in splits.items()} == {
        split: (6, 20, 3, 16, 16) for split in ("train", "val", "test")
    }
    assert capsys.readouterr().err.startswith(
        f"warning: cannot write the decoded cache to {cache_dir} (not a directory)"
    )


def test_run_with_an_unwritable_cache_finishes(tmp_path: Path) -> None:
    """The whole run: before, the cache write ended it with a traceback after decoding."""
    (tmp_path / "a_file").write_text("not a folder")
    cache_dir = tmp_path / "a_file" / "cache"
    proc = maml_run(
        [
            "experiment=finn17_miniimagenet_5w1s",
            f"data.root={MINI}",
            f"data.cache_dir={cache_dir}",
            "task.image_size=16",
            "model.filters=8",
            "inner.steps=1",
            "inner.eval_steps=1",
            "eval.report_steps=[0,1]",
            "trainer.num_threads=1",
            *QUICK,
            "trainer.steps=2",
            "trainer.val_every=2",
            "trainer.val_tasks=2",
            "trainer.checkpoint_every=2",
            "eval.num_tasks=2",
            "eval.batch_size=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: cannot write the decoded cache to {cache_dir} (not a directory); "
        "continuing without it"
    ]
    assert "Traceback" not in proc.stderr
    assert read_metrics(tmp_path / "run")["train"]["steps"] == 2


# --- (c) a corrupt member inside an archive -------------------------------------------------

MEMBER = "images_background/Zeta/character02/0002_07.png"  # one drawing of the fake set


def _damage(zip_path: Path, how: str) -> None:
    """Damage ``MEMBER`` of ``zip_path`` in place, leaving every other member readable."""
    raw = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(MEMBER)
    if how == "deflate":  # first byte of the stream: BFINAL=1, BTYPE=11, a reserved block type
        name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
        raw[info.header_offset + 30 + name_len + extra_len] = 0xFF
    elif how == "crc":  # the central directory's CRC-32 (the one zipfile checks) no longer fits
        entry = raw.rindex(MEMBER.encode()) - 46  # the name follows the 46-byte central header
        assert raw[entry : entry + 4] == b"PK\x01\x02"
        struct.pack_into("<I", raw, entry + 16, info.CRC ^ 0xFFFFFFFF)
    else:  # "png": the member inflates fine but holds no image
        with zipfile.ZipFile(zip_path) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()}
        members[MEMBER] = b"\x89PNG but not really" * 10
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return
    zip_path.write_bytes(bytes(raw))


def _damaged_copy(tmp_path: Path, source: Path, how: str) -> Path:
    """A copy of the fake zips with ``MEMBER`` damaged, listed in its own SHA256SUMS."""
    root = tmp_path / "root"
    shutil.copytree(source, root)
    _damage(root / BACKGROUND_ZIP, how)
    lines = [f"{archives.sha256sum(root / n)}  {n}\n" for n in ARCHIVES]
    (root / "SHA256SUMS").write_text("".join(lines))
    return root


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("deflate", "Error -3 while decompressing data: invalid block type"),
        ("crc", f"Bad CRC-32 for file '{MEMBER}'"),
        ("png", "not a PNG image"),
    ],
)
def test_corrupt_member_names_archive_and_member(
    how: str, reason: str, tmp_path: Path, fake_omniglot: tuple[Path, dict[str, str]]
) -> None:
    root = _damaged_copy(tmp_path, fake_omniglot[0], how)
    with pytest.raises(UserError) as err:
        load_omniglot(root, cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        f"{root / BACKGROUND_ZIP}: member {MEMBER} cannot be decoded ({reason}); the archive is "
        "damaged: replace it with an intact copy (the official one: delete it and turn download on)"
    )
    assert not (tmp_path / "cache").exists()  # nothing cached from a damaged archive


def test_run_on_a_corrupt_archive_ends_in_one_line(
    tmp_path: Path, fake_omniglot: tuple[Path, dict[str, str]]
) -> None:
    root = _damaged_copy(tmp_path, fake_omniglot[0], "deflate")
    proc = maml_run(
        [
            "task=omniglot",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *QUICK,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {root / BACKGROUND_ZIP}: member {MEMBER} cannot be")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
