"""The miniImageNet loader: the three layouts, resizing, order, cache and error messages.

Everything runs on a tiny generated set (``make_fixture``: 3 train / 2 val / 2 test classes of 4
random images); other tests may import ``make_fixture`` and ``expected_split``.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maml_runner.data import miniimagenet
from maml_runner.data.miniimagenet import decode, load_miniimagenet
from maml_runner.errors import InvalidArgument

# Listed unsorted to check that classes come out sorted by wnid.
CLASSES = {
    "train": ["n03000003", "n01000001", "n02000002"],
    "val": ["n05000005", "n04000004"],
    "test": ["n07000007", "n06000006"],
}
PER_CLASS = 4
RAW_SIZE = (90, 100)  # (width, height) of the generated images: not 84x84, so they are resized


def raw_image(split: str, wnid: str, j: int) -> np.ndarray:
    """The generated ``uint8 [H, W, 3]`` image ``j`` of class ``wnid`` (deterministic)."""
    seed = [ord(c) for c in f"{split}/{wnid}/{j}"]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (RAW_SIZE[1], RAW_SIZE[0], 3), dtype=np.uint8)


def _resized(array: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(array)
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def expected_split(split: str, image_size: int = 84) -> torch.Tensor:
    """What the loader must return for ``split`` of a PNG fixture: ``uint8 [C, 4, 3, S, S]``."""
    out = np.stack(
        [
            np.stack(
                [_resized(raw_image(split, w, j), image_size) for j in range(PER_CLASS)]
            ).transpose(0, 3, 1, 2)
            for w in sorted(CLASSES[split])
        ]
    )
    return torch.from_numpy(out)


def make_fixture(tmp_path: Path, layout: str, *, fmt: str = "png") -> Path:
    """Write a tiny miniImageNet in ``layout`` (``"csv"``, ``"folders"`` or ``"pickle"``).

    Args:
        tmp_path: folder to create ``miniimagenet_<layout>`` in.
        layout: which of the loader's layouts to write.
        fmt: image file format for ``csv``/``folders`` (``"png"`` is lossless, ``"jpg"`` not).

    Returns:
        The dataset root. Images are 90x100 (``RAW_SIZE``) in ``csv``/``folders``; the pickles
        hold the same images already LANCZOS-resized to 84x84, so all three layouts of a PNG
        fixture decode to ``expected_split``.
    """
    root = tmp_path / f"miniimagenet_{layout}"
    root.mkdir(parents=True)
    for split, wnids in CLASSES.items():
        # example-major, so a class's rows are interleaved with the others' in CSVs and pickles
        items = [(w, j) for j in range(PER_CLASS) for w in wnids]
        if layout == "pickle":
            data = np.stack([_resized(raw_image(split, w, j), 84) for w, j in items])
            class_dict: dict[str, list[int]] = {}
            for i, (w, _) in enumerate(items):
                class_dict.setdefault(w, []).append(i)
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f)
            continue
        if layout == "csv":
            (root / "images").mkdir(exist_ok=True)
            with open(root / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "label"])
                for w, j in items:
                    name = f"{w}{j:08d}.{fmt}"
                    Image.fromarray(raw_image(split, w, j)).save(root / "images" / name)
                    writer.writerow([name, w])
        elif layout == "folders":
            for w, j in items:
                folder = root / split / w
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(raw_image(split, w, j)).save(folder / f"{w}{j:08d}.{fmt}")
        else:
            raise ValueError(f"layout {layout!r}")
    return root


LAYOUTS = ("csv", "folders", "pickle")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_decode_to_the_same_tensors(tmp_path: Path, layout: str) -> None:
    root = make_fixture(tmp_path, layout)
    assert miniimagenet.detect_layout(root) == layout
    splits = load_miniimagenet(root, cache_dir=tmp_path / "cache")
    assert set(splits) == {"train", "val", "test"}
    for split, wnids in CLASSES.items():
        images = splits[split]
        assert images.dtype == torch.uint8
        assert tuple(images.shape) == (len(wnids), PER_CLASS, 3, 84, 84)
        assert torch.equal(images, expected_split(split))
    _, classes = decode(root)
    assert classes == {s: sorted(w) for s, w in CLASSES.items()}


def test_jpeg_images_are_decoded_and_resized(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "folders", fmt="jpg")
    splits = load_miniimagenet(root, cache_dir=tmp_path / "cache")
    images = splits["train"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (3, PER_CLASS, 3, 84, 84)
    # lossy, and noise compresses badly: only check that it is the same picture, roughly
    diff = (images.float() - expected_split("train").float()).abs().mean()
    assert diff < 40, diff


def test_other_image_size(tmp_path: Path) -> None:
    for layout in ("csv", "pickle"):
        root = make_fixture(tmp_path, layout)
        splits = load_miniimagenet(root, cache_dir=tmp_path / "cache", image_size=32)
        assert tuple(splits["val"].shape) == (2, PER_CLASS, 3, 32, 32)
        assert list((tmp_path / "cache").glob("miniimagenet_32px_*.pt"))
    assert torch.equal(
        load_miniimagenet(tmp_path / "miniimagenet_csv", cache_dir=tmp_path / "c2", image_size=32)[
            "test"
        ],
        expected_split("test", 32),
    )


def test_cache_is_reused_and_keyed_by_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_fixture(tmp_path, "csv")
    cache_dir = tmp_path / "cache"
    first = load_miniimagenet(root, cache_dir=cache_dir)
    files = list(cache_dir.glob("miniimagenet_84px_*.pt"))
    assert len(files) == 1

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(miniimagenet, "decode", no_decode)
    second = load_miniimagenet(root, cache_dir=cache_dir)
    assert all(torch.equal(first[s], second[s]) for s in first)
    monkeypatch.undo()

    # a changed input file (new mtime) gives a new key
    image = next((root / "images").iterdir())
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_miniimagenet(root, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("miniimagenet_84px_*.pt"))) == 2

    # a corrupt cache is rebuilt
    files[0].write_bytes(b"not a torch file")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger=miniimagenet.__name__):
        third = load_miniimagenet(root, cache_dir=cache_dir)
    assert "rebuilding" in caplog.text
    assert all(torch.equal(first[s], third[s]) for s in first)
    assert load_miniimagenet(root, cache_dir=cache_dir)["train"].shape[0] == 3


def test_unequal_classes_are_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_fixture(tmp_path, "folders")
    (root / "train" / "n02000002" / f"n02000002{3:08d}.png").unlink()
    with caplog.at_level(logging.WARNING, logger=miniimagenet.__name__):
        splits = load_miniimagenet(root, cache_dir=tmp_path / "cache")
    assert tuple(splits["train"].shape) == (3, 3, 3, 84, 84)
    assert torch.equal(splits["train"], expected_split("train")[:, :3])
    assert tuple(splits["val"].shape) == (2, PER_CLASS, 3, 84, 84)
    assert "train split" in caplog.text and "n02000002: 3" in caplog.text


# --- error messages -----------------------------------------------------------------------


def _error(root: object, tmp_path: Path, name: str = "root", **kwargs: object) -> str:
    """The message of the ``InvalidArgument`` loading ``root`` raises; it must name ``name``."""
    with pytest.raises(InvalidArgument) as info:
        load_miniimagenet(root, cache_dir=tmp_path / "cache", **kwargs)  # type: ignore[arg-type]
    assert info.value.name == name
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("root", [None, ""])
def test_unset_root(tmp_path: Path, root: object) -> None:
    message = _error(root, tmp_path)
    assert message.startswith("root=None: miniImageNet is not downloadable automatically")
    assert "mini-imagenet-cache-*.pkl" in message and "point root at it" in message


def test_missing_root(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere", tmp_path)
    assert f"root={tmp_path / 'nowhere'}: no such folder" in message
    assert "not downloadable automatically" in message


def test_unknown_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    message = _error(root, tmp_path)
    assert "no miniImageNet layout found" in message and "found none of them" in message
    for what in ("mini-imagenet-cache-{train,val,test}.pkl", "train.csv", "images/", "val/"):
        assert what in message
    (root / "train.csv").write_text("filename,label\n")
    (root / "test").mkdir()
    assert "found only train.csv, test/" in _error(root, tmp_path)


def test_csv_naming_a_missing_image(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "csv")
    (root / "images" / f"n04000004{2:08d}.png").unlink()
    message = _error(root, tmp_path)
    assert f"val.csv line 7 names images/n04000004{2:08d}.png, which is missing" in message


def test_csv_bad_header(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "csv")
    (root / "test.csv").write_text("name,wnid\nx.png,n1\n")
    assert "test.csv must start with the header 'filename,label'" in _error(root, tmp_path)


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "folders")
    bad = root / "test" / "n06000006" / f"n06000006{1:08d}.png"
    bad.write_bytes(b"not an image")
    assert f"cannot read image {bad}" in _error(root, tmp_path)


def test_bad_pickle(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "pickle")
    with open(root / "mini-imagenet-cache-val.pkl", "wb") as f:
        pickle.dump({"images": [1, 2]}, f)
    assert "mini-imagenet-cache-val.pkl is not a miniImageNet cache" in _error(root, tmp_path)


def test_bad_image_size(tmp_path: Path) -> None:
    root = make_fixture(tmp_path, "pickle")
    message = _error(root, tmp_path, "image_size", image_size=0)
    assert "image_size=0: must be an integer >= 1" in message
