"""The Omniglot data layer: archive checks, download, decoding, cache and splits.

The full set (``../shared/data/omniglot`` beside the repository) is decoded once per session;
downloads and md5 checks use a tiny generated set in the same layout, since the shared zips are
rebuilt and do not match the official md5.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from maml_runner.data import archives
from maml_runner.data.omniglot import (
    ARCHIVES,
    BACKGROUND_ZIP,
    EVALUATION_ZIP,
    OmniglotData,
    background_split,
    load_omniglot,
    paper_split,
)
from maml_runner.errors import InvalidArgument, UserError
from tests.helpers import HAS_OMNIGLOT, NO_OMNIGLOT, OMNIGLOT, needs_omniglot


@pytest.fixture(scope="session")
def full_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def omniglot(full_cache: Path) -> OmniglotData:
    """The full set at 28 px, decoded once for the whole session."""
    if not HAS_OMNIGLOT:
        pytest.skip(NO_OMNIGLOT)
    return load_omniglot(OMNIGLOT, cache_dir=full_cache)


# --- a tiny fake Omniglot -------------------------------------------------------------------

# Written in unsorted order to check the loader's sorting. Character ids count up in this order.
FAKE = {
    "images_background": {"Zeta": 2, "Alpha": 1},
    "images_evaluation": {"Gamma": 2},
}


def _drawing(char: int, drawer: int) -> bytes:
    """105x105 mode-'1' PNG, white paper, one black 20x20 square placed by (char, drawer)."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (105, 105), 1)
    x0, y0 = 4 * drawer, 4 * char
    ImageDraw.Draw(im).rectangle([x0, y0, x0 + 19, y0 + 19], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _make_fake(folder: Path) -> dict[str, str]:
    """Write the fake zips into ``folder``; return their md5s."""
    folder.mkdir(parents=True, exist_ok=True)
    char_id = 0
    for split, alphabets in FAKE.items():
        with zipfile.ZipFile(folder / f"{split}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{split}/", b"")
            for alphabet, count in alphabets.items():
                zf.writestr(f"{split}/{alphabet}/", b"")
                for c in range(1, count + 1):
                    char_id += 1
                    base = f"{split}/{alphabet}/character{c:02d}"
                    zf.writestr(base + "/", b"")
                    for drawer in range(20, 0, -1):  # reverse order on purpose
                        zf.writestr(f"{base}/{char_id:04d}_{drawer:02d}.png", _drawing(c, drawer))
    return {name: archives.md5sum(folder / name) for name in ARCHIVES}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("fake_src")
    return folder, _make_fake(folder)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_url(fake: tuple[Path, dict[str, str]]):
    """``http://127.0.0.1:<port>/`` serving the fake zips from a thread."""
    handler = functools.partial(_QuietHandler, directory=str(fake[0]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the full set ---------------------------------------------------------------------------


@needs_omniglot
def test_full_set_counts(omniglot: OmniglotData) -> None:
    assert omniglot.images.shape == (1623, 20, 28, 28)
    assert omniglot.images.dtype == torch.uint8
    assert omniglot.images[:, :].flatten(0, 1).shape[0] == 32_460
    bg = omniglot.background
    assert bg.dtype == torch.bool and bg.shape == (1623,)
    assert int(bg.sum()) == 964 and int((~bg).sum()) == 659
    assert bool(bg[:964].all()) and not bool(bg[964:].any())  # background first
    alphabets = [(a, b) for a, b in zip(omniglot.alphabets, bg.tolist())]
    assert len({a for a, b in alphabets if b}) == 30
    assert len({a for a, b in alphabets if not b}) == 20
    assert len(set(omniglot.alphabets)) == 50
    ids = omniglot.character_ids
    assert sorted(ids) == list(range(1, 1624))
    assert set(ids[:964]) == set(range(1, 965))
    # sorted by alphabet within each split
    assert omniglot.alphabets[:964] == sorted(omniglot.alphabets[:964])
    assert omniglot.alphabets[964:] == sorted(omniglot.alphabets[964:])


@needs_omniglot
def test_full_set_pixels(omniglot: OmniglotData) -> None:
    x = omniglot.images
    peak = x.flatten(2).amax(-1)
    assert int(peak.min()) >= 128  # no blank drawing
    mean = x.float().mean().item() / 255
    assert 0.03 < mean < 0.2  # ink is sparse and bright (measured: 0.084)
    assert (x == 0).float().mean().item() > 0.6  # most of the paper is 0


@needs_omniglot
def test_braille_duplicate_quirk(omniglot: OmniglotData) -> None:
    row = omniglot.character_ids.index(192)
    assert omniglot.alphabets[row] == "Braille"
    drawings = omniglot.images[row]
    assert torch.equal(drawings[2], drawings[18])  # 0192_03.png == 0192_19.png
    assert not torch.equal(drawings[2], drawings[3])


@needs_omniglot
def test_cache_is_reused(omniglot: OmniglotData, full_cache: Path) -> None:
    files = list(full_cache.glob("omniglot_28px_*.pt"))
    assert len(files) == 1
    start = time.perf_counter()
    again = load_omniglot(OMNIGLOT, cache_dir=full_cache)
    assert time.perf_counter() - start < 3.0
    assert torch.equal(again.images, omniglot.images)
    assert torch.equal(again.background, omniglot.background)
    assert again.alphabets == omniglot.alphabets
    assert again.character_ids == omniglot.character_ids
    assert list(full_cache.glob("omniglot_28px_*.pt")) == files


@needs_omniglot
def test_checksum_helpers_on_shared() -> None:
    sums = archives.read_checksum_file(OMNIGLOT / "SHA256SUMS")
    assert set(sums) == set(ARCHIVES)
    md5s = archives.read_checksum_file(OMNIGLOT / "MD5SUMS")
    for name in ARCHIVES:
        assert archives.sha256sum(OMNIGLOT / name) == sums[name]
        assert archives.md5sum(OMNIGLOT / name) == md5s[name]


def test_read_checksum_file_formats(tmp_path: Path) -> None:
    f = tmp_path / "SUMS"
    f.write_text("# comment\n\nABCDEF01  a.zip\nabcdef02 *b.zip\n")
    assert archives.read_checksum_file(f) == {"a.zip": "abcdef01", "b.zip": "abcdef02"}
    f.write_text("not-a-digest a.zip\n")
    with pytest.raises(UserError, match="line 1"):
        archives.read_checksum_file(f)


# --- archive checks -------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@needs_omniglot
@pytest.mark.parametrize("with_sums", [True, False])
def test_corrupt_archive_is_refused(tmp_path: Path, with_sums: bool) -> None:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copyfile(OMNIGLOT / BACKGROUND_ZIP, root / BACKGROUND_ZIP)
    _flip(root / BACKGROUND_ZIP)
    (root / EVALUATION_ZIP).symlink_to(OMNIGLOT / EVALUATION_ZIP)
    if with_sums:
        shutil.copyfile(OMNIGLOT / "SHA256SUMS", root / "SHA256SUMS")
    with pytest.raises(InvalidArgument) as err:
        load_omniglot(root, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert err.value.name == "root" and err.value.value == root
    assert BACKGROUND_ZIP in message and "\n" not in message
    assert ("sha256" if with_sums else "official md5") in message
    assert not (tmp_path / "cache").exists()  # nothing decoded


def test_missing_archive_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert err.value.name == "root"
    assert message.startswith(f"root={tmp_path}: {BACKGROUND_ZIP} is missing")
    assert EVALUATION_ZIP in message and "turn download on" in message
    pattern = r"root=None: the default folder .*omniglot has no .*turn download on"
    with pytest.raises(InvalidArgument, match=pattern):
        load_omniglot(None, cache_dir=tmp_path / "cache")


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="image_size=0: must be an integer >= 1"):
        load_omniglot(tmp_path, cache_dir=tmp_path, image_size=0)
    with pytest.raises(InvalidArgument, match="resample=bicubic: choose one of lanczos, nearest"):
        load_omniglot(tmp_path, cache_dir=tmp_path, resample="bicubic")


# --- download, decoding and cache on the fake set -------------------------------------------


def _check_fake(data: OmniglotData, size: int) -> None:
    assert data.images.shape == (5, 20, size, size)
    assert data.alphabets == ["Alpha", "Zeta", "Zeta", "Gamma", "Gamma"]
    assert data.character_ids == [3, 1, 2, 4, 5]
    assert data.background.tolist() == [True, True, True, False, False]


def test_download_over_http(
    tmp_path: Path, fake: tuple[Path, dict[str, str]], http_url: str
) -> None:
    root = tmp_path / "root"
    data = load_omniglot(
        root, cache_dir=tmp_path / "cache", download=True, base_url=http_url, md5s=fake[1]
    )
    _check_fake(data, 28)
    for name in ARCHIVES:
        assert (root / name).read_bytes() == (fake[0] / name).read_bytes()
    assert sorted(p.name for p in root.iterdir()) == sorted(ARCHIVES)  # no temporary files


def test_download_from_file_url(tmp_path: Path, fake: tuple[Path, dict[str, str]]) -> None:
    cache = tmp_path / "cache"
    data = load_omniglot(
        None, cache_dir=cache, download=True, base_url=fake[0].as_uri(), md5s=fake[1]
    )
    _check_fake(data, 28)
    assert all((cache / "omniglot" / name).is_file() for name in ARCHIVES)


def test_download_md5_mismatch(
    tmp_path: Path, fake: tuple[Path, dict[str, str]], http_url: str
) -> None:
    wrong = dict(fake[1], **{BACKGROUND_ZIP: "0" * 32})
    root = tmp_path / "root"
    with pytest.raises(UserError) as err:
        load_omniglot(
            root, cache_dir=tmp_path / "cache", download=True, base_url=http_url, md5s=wrong
        )
    message = str(err.value)
    assert BACKGROUND_ZIP in message and "0" * 32 in message and fake[1][BACKGROUND_ZIP] in message
    assert not root.exists() or list(root.iterdir()) == []  # nothing half-written kept


def test_download_failure_is_a_user_error(tmp_path: Path, http_url: str) -> None:
    with pytest.raises(UserError, match="download of missing.zip failed"):
        archives.download(http_url + "missing.zip", tmp_path / "missing.zip")
    assert not (tmp_path / "missing.zip").exists()


def test_pixel_convention_and_order(tmp_path: Path, fake: tuple[Path, dict[str, str]]) -> None:
    data = load_omniglot(
        fake[0], cache_dir=tmp_path, image_size=105, resample="nearest", md5s=fake[1]
    )
    _check_fake(data, 105)
    assert set(data.images.unique().tolist()) == {0, 255}
    for row, c in enumerate([1, 1, 2, 1, 2]):  # character folder number of each row
        for j in range(20):
            drawer = j + 1  # drawings sorted by file name XXXX_01 .. XXXX_20
            expected = torch.zeros(105, 105, dtype=torch.uint8)
            expected[4 * c : 4 * c + 20, 4 * drawer : 4 * drawer + 20] = 255
            assert torch.equal(data.images[row, j], expected)
    small = load_omniglot(fake[0], cache_dir=tmp_path, md5s=fake[1])  # lanczos: greys too
    assert len(small.images.unique()) > 2 and int(small.images.max()) == 255


def test_corrupt_cache_is_rebuilt(tmp_path: Path, fake: tuple[Path, dict[str, str]]) -> None:
    first = load_omniglot(fake[0], cache_dir=tmp_path, md5s=fake[1])
    (cache,) = tmp_path.glob("omniglot_28px_*.pt")
    cache.write_bytes(b"not a torch file")
    again = load_omniglot(fake[0], cache_dir=tmp_path, md5s=fake[1])
    assert torch.equal(first.images, again.images)
    assert cache.stat().st_size > 1000  # rewritten
    assert list(tmp_path.glob("omniglot_28px_*.pt")) == [cache]


def test_cache_key_depends_on_size(tmp_path: Path, fake: tuple[Path, dict[str, str]]) -> None:
    load_omniglot(fake[0], cache_dir=tmp_path, md5s=fake[1])
    load_omniglot(fake[0], cache_dir=tmp_path, image_size=14, md5s=fake[1])
    assert len(list(tmp_path.glob("omniglot_28px_*.pt"))) == 1
    assert len(list(tmp_path.glob("omniglot_14px_*.pt"))) == 1


def test_sha256sums_file_takes_precedence(
    tmp_path: Path, fake: tuple[Path, dict[str, str]]
) -> None:
    root = tmp_path / "root"
    shutil.copytree(fake[0], root)
    lines = [f"{archives.sha256sum(root / n)}  {n}\n" for n in ARCHIVES]
    (root / "SHA256SUMS").write_text("".join(lines))
    # default md5s are the official ones, which the fake zips fail: SHA256SUMS is used instead
    _check_fake(load_omniglot(root, cache_dir=tmp_path / "cache"), 28)


# --- splits ---------------------------------------------------------------------------------


def test_paper_split() -> None:
    split = paper_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 1100, "val": 100, "test": 423}
    everything = torch.cat(list(split.values()))
    assert everything.dtype == torch.long
    assert sorted(everything.tolist()) == list(range(1623))  # disjoint and covering
    assert all(torch.equal(split[k], paper_split()[k]) for k in split)  # fixed seed
    assert not torch.equal(split["train"], paper_split(seed=2)["train"])
    with pytest.raises(InvalidArgument, match="num_train=2000: there are 1623 characters"):
        paper_split(num_train=2000)


@needs_omniglot
def test_background_split(omniglot: OmniglotData) -> None:
    split = background_split(omniglot)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes["test"] == 659 and sizes["train"] + sizes["val"] == 964
    assert sorted(torch.cat(list(split.values())).tolist()) == list(range(1623))
    by = {k: {omniglot.alphabets[i] for i in v.tolist()} for k, v in split.items()}
    assert len(by["train"]) == 25 and len(by["val"]) == 5 and len(by["test"]) == 20
    assert not (by["train"] & by["val"] or by["train"] & by["test"] or by["val"] & by["test"])
    background = sorted(by["train"] | by["val"])
    assert by["val"] == set(background[-5:])
    assert bool(omniglot.background[split["train"]].all())
    assert not bool(omniglot.background[split["test"]].any())
    named = background_split(omniglot, val_alphabets=["Braille", "Latin"])
    assert {omniglot.alphabets[i] for i in named["val"].tolist()} == {"Braille", "Latin"}
    with pytest.raises(
        InvalidArgument, match=r"val_alphabets=\['Klingon'\]: \['Klingon'\] are not"
    ):
        background_split(omniglot, val_alphabets=["Klingon"])


def test_background_split_on_fake(tmp_path: Path, fake: tuple[Path, dict[str, str]]) -> None:
    data = load_omniglot(fake[0], cache_dir=tmp_path, md5s=fake[1])
    split = background_split(data, val_alphabets=1)
    assert split["train"].tolist() == [0] and split["val"].tolist() == [1, 2]
    assert split["test"].tolist() == [3, 4]


def test_md5_helper_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"omniglot" * 1000)
    assert archives.md5sum(f) == hashlib.md5(f.read_bytes()).hexdigest()
    assert archives.sha256sum(f) == hashlib.sha256(f.read_bytes()).hexdigest()
