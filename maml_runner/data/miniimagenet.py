"""miniImageNet (Ravi & Larochelle 2017 split) from a local folder, decoded once into a cache.

The split has 64 train, 16 val and 20 test classes of 600 images each, used at 84x84 RGB.
Nothing is downloaded (the data's licence and hosting do not allow it); ``load_miniimagenet``
reads a folder ``root`` in one of three common layouts, detected in this order:

``pickle``
    ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with ``image_data`` (``uint8
    [N, 84, 84, 3]``) and ``class_dict`` (``{wnid: [indices into image_data]}``).
``csv``
    ``images/*.jpg`` with ``train.csv``, ``val.csv`` and ``test.csv`` (header ``filename,label``,
    the label a WordNet id such as ``n01532829``): Ravi's own format.
``folders``
    ``{train,val,test}/<wnid>/<image>`` (any file Pillow reads; hidden files skipped).

Result: ``{"train", "val", "test"}`` -> ``uint8 [classes, examples, 3, S, S]``. Order (fixed,
independent of the file system): classes sorted by wnid; a class's examples in CSV row order
(``csv``), file name order (``folders``) or ascending index order (``pickle``).

Pixels: every image is converted to RGB and, when not already ``S x S``, resized to it with
Pillow's LANCZOS filter (no crop, so the aspect ratio is not kept, as in the published
preprocessing). Divide by 255 for ``[0, 1]`` inputs.

Unequal classes: every class of a split must have the same number of examples to fit one
tensor. When they differ, each class of that split is truncated to the smallest count (its
first examples in the order above) and a warning names the split and the counts; the Ravi &
Larochelle split has 600 everywhere, so this only happens for incomplete or custom copies.

Cache: ``cache_dir/miniimagenet_{S}px_{key}.pt``; ``key`` hashes the layout, the listing of the
input files (relative names, sizes, mtimes), ``S`` and ``FORMAT``. A cache that cannot be read
or does not match is rebuilt; writes are atomic.

References:
    Ravi & Larochelle (2017), "Optimization as a model for few-shot learning", ICLR
    (split CSVs: github.com/twitter/meta-learning-lstm).
    Vinyals et al. (2016), "Matching networks for one shot learning", NeurIPS.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from maml_runner.data import archives
from maml_runner.errors import InvalidArgument, choose, positive_int

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LAYOUTS = ("pickle", "csv", "folders")
ORIGINAL_SIZE = 84
FORMAT = 1  # bump when the decoded content or the cache layout changes
PICKLE_NAME = "mini-imagenet-cache-{split}.pkl"
CSV_HEADER = ["filename", "label"]

HOW_TO_GET = (
    "miniImageNet is not downloadable automatically; obtain the Ravi & Larochelle split "
    "(images + train/val/test CSVs, or the mini-imagenet-cache-*.pkl files) and point root at it"
)
LOOKED_FOR = (
    "mini-imagenet-cache-{train,val,test}.pkl; images/ with train.csv, val.csv and test.csv; "
    "or train/, val/ and test/ holding one folder per wnid"
)


def load_miniimagenet(
    root: str | Path | None, *, cache_dir: Path, image_size: int = ORIGINAL_SIZE
) -> dict[str, torch.Tensor]:
    """Find miniImageNet in ``root``, then load the decoded splits from cache or decode them.

    Args:
        root: folder holding one of the layouts in the module docstring; never downloaded.
        cache_dir: where ``miniimagenet_{image_size}px_{key}.pt`` is kept; a folder that cannot
            be written costs only the cache (one warning line).
        image_size: side ``S`` of the square RGB images (84 keeps the standard size).

    Returns:
        ``{"train", "val", "test"}``: ``uint8 [classes, examples, 3, S, S]``, classes sorted
        by wnid.

    Raises:
        InvalidArgument: ``image_size`` not an integer >= 1; ``root`` unset or missing, no known
            layout in it, a CSV naming a missing image, an unreadable image or pickle, or a split
            without classes.
    """
    positive_int("image_size", image_size)
    root = _check_root(root)
    layout = detect_layout(root)
    listing = _listing(root, layout)
    key = _cache_key(layout, listing, image_size)
    cache = Path(cache_dir).expanduser() / f"miniimagenet_{image_size}px_{key}.pt"
    splits = _load_cache(cache, image_size)
    if splits is None:
        start = time.perf_counter()
        splits, classes = decode(root, image_size=image_size, layout=layout)
        log.info("decoded miniImageNet (%s layout) in %.1f s", layout, time.perf_counter() - start)
        _save_cache(cache, splits, classes)
    return splits


def _check_root(root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise InvalidArgument("root", None, HOW_TO_GET)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InvalidArgument("root", root, f"no such folder; {HOW_TO_GET}")
    return path


def detect_layout(root: Path) -> str:
    """The layout of ``root``: ``"pickle"``, ``"csv"`` or ``"folders"`` (first one complete).

    Raises:
        InvalidArgument: (``root``) none is complete; the message lists what was looked for
            and what was found.
    """
    if all((root / PICKLE_NAME.format(split=s)).is_file() for s in SPLITS):
        return "pickle"
    if (root / "images").is_dir() and all((root / f"{s}.csv").is_file() for s in SPLITS):
        return "csv"
    if all((root / s).is_dir() for s in SPLITS):
        return "folders"
    found = [
        name
        for name in [PICKLE_NAME.format(split=s) for s in SPLITS]
        + ["images/"]
        + [f"{s}.csv" for s in SPLITS]
        + [f"{s}/" for s in SPLITS]
        if (root / name.rstrip("/")).exists()
    ]
    have = f"found only {', '.join(found)}" if found else "found none of them"
    raise InvalidArgument(
        "root",
        root,
        f"no miniImageNet layout found; looked for {LOOKED_FOR} ({have}); {HOW_TO_GET}",
    )


def _read_csv(root: Path, split: str) -> list[tuple[str, str]]:
    """Rows ``(filename, wnid)`` of ``root/{split}.csv``, checked against ``root/images``."""
    path = root / f"{split}.csv"
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        raise InvalidArgument(
            "root",
            root,
            f"{path.name} must start with the header '{','.join(CSV_HEADER)}' "
            "(Ravi & Larochelle's format)",
        )
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InvalidArgument(
                "root", root, f"{path.name} line {number} is not 'filename,label'"
            )
        name, wnid = row[0].strip(), row[1].strip()
        if not (root / "images" / name).is_file():
            raise InvalidArgument(
                "root", root, f"{path.name} line {number} names images/{name}, which is missing"
            )
        out.append((name, wnid))
    return out


def _folder_files(root: Path, split: str) -> dict[str, list[Path]]:
    """``{wnid: image paths sorted by name}`` of ``root/split`` (hidden entries skipped)."""
    groups: dict[str, list[Path]] = {}
    for folder in sorted((root / split).iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
        if files:
            groups[folder.name] = files
    return groups


def _listing(root: Path, layout: str) -> list[tuple[str, int, int]]:
    """``(relative name, size, mtime ns)`` of every input file; the cache key's input."""
    if layout == "pickle":
        paths: Iterable[Path] = [root / PICKLE_NAME.format(split=s) for s in SPLITS]
    elif layout == "csv":
        names = {name for s in SPLITS for name, _ in _read_csv(root, s)}
        paths = [root / f"{s}.csv" for s in SPLITS] + [root / "images" / n for n in sorted(names)]
    else:
        paths = [p for s in SPLITS for files in _folder_files(root, s).values() for p in files]
    out = []
    for path in paths:
        st = path.stat()
        out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _cache_key(layout: str, listing: Sequence[tuple[str, int, int]], image_size: int) -> str:
    h = hashlib.sha256(f"miniimagenet-format{FORMAT}|{image_size}|{layout}".encode())
    for name, size, mtime in listing:
        h.update(f"\n{name}|{size}|{mtime}".encode())
    return h.hexdigest()[:12]


def _load_cache(path: Path, image_size: int) -> dict[str, torch.Tensor] | None:
    """The cached splits, or ``None`` when absent or unreadable (then they are rebuilt)."""

    def parse(state: dict) -> dict[str, torch.Tensor]:
        splits = {s: state["images"][s] for s in SPLITS}
        for s, images in splits.items():
            if (
                not isinstance(images, torch.Tensor)
                or images.dtype != torch.uint8
                or images.dim() != 5
                or tuple(images.shape[2:]) != (3, image_size, image_size)
                or len(state["classes"][s]) != images.shape[0]
            ):
                raise ValueError(f"unexpected shape or dtype in split {s}")
        return splits

    return archives.read_cache(path, FORMAT, parse, "miniImageNet")


def _save_cache(path: Path, splits: dict[str, torch.Tensor], classes: dict[str, list[str]]) -> None:
    archives.write_cache(path, {"images": splits, "classes": classes}, FORMAT)


def decode(
    root: str | Path, *, image_size: int = ORIGINAL_SIZE, layout: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Decode the three splits of ``root`` without any cache.

    Args:
        root: the dataset folder.
        image_size: output side ``S``.
        layout: one of ``LAYOUTS``; ``None`` detects it.

    Returns:
        ``(splits, classes)``: ``{split: uint8 [C, N, 3, S, S]}`` and ``{split: [wnid, ...]}``
        (sorted, one per row of the tensor).

    Raises:
        InvalidArgument: as ``load_miniimagenet``; a ``layout`` not in ``LAYOUTS``.
    """
    root = Path(root)
    layout = detect_layout(root) if layout is None else layout
    choose("layout", layout, LAYOUTS)
    splits, classes = {}, {}
    for split in SPLITS:
        if layout == "pickle":
            images, wnids = _decode_pickle(root, split, image_size)
        else:
            if layout == "csv":
                groups: dict[str, list[Path]] = {}
                for name, wnid in _read_csv(root, split):
                    groups.setdefault(wnid, []).append(root / "images" / name)
            else:
                groups = _folder_files(root, split)
            if not groups:
                raise InvalidArgument("root", root, f"the {split} split ({layout} layout) is empty")
            wnids = sorted(groups)
            counts = _equalize(split, {w: len(groups[w]) for w in wnids})
            images = np.empty((len(wnids), counts, 3, image_size, image_size), np.uint8)
            for i, wnid in enumerate(wnids):
                for j, path in enumerate(groups[wnid][:counts]):
                    images[i, j] = _read_image(path, image_size, root)
        splits[split] = torch.from_numpy(images)
        classes[split] = wnids
    return splits, classes


def _equalize(split: str, counts: dict[str, int]) -> int:
    """The examples per class to keep: the smallest count (warned about when counts differ)."""
    low = min(counts.values())
    if low != max(counts.values()):
        few = ", ".join(f"{w}: {n}" for w, n in sorted(counts.items()) if n == low)
        log.warning(
            "miniImageNet %s split: classes have %d to %d examples; keeping the first %d of "
            "each (smallest: %s)",
            split,
            low,
            max(counts.values()),
            low,
            few,
        )
    return low


def _read_image(path: Path, image_size: int, root: Path) -> np.ndarray:
    """One image as ``uint8 [3, S, S]`` (RGB, LANCZOS-resized when not already ``S x S``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _to_chw(im, image_size)
    except OSError as e:
        raise InvalidArgument("root", root, f"cannot read image {path} ({e})") from None


def _to_chw(im: PILImage, image_size: int) -> np.ndarray:
    """``im`` as RGB ``uint8 [3, S, S]``, LANCZOS-resized when not already ``S x S``."""
    from PIL import Image

    im = im.convert("RGB")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _decode_pickle(root: Path, split: str, image_size: int) -> tuple[np.ndarray, list[str]]:
    """``(uint8 [C, N, 3, S, S], wnids)`` from ``mini-imagenet-cache-{split}.pkl``."""
    from PIL import Image

    path = root / PICKLE_NAME.format(split=split)
    try:
        with open(path, "rb") as f:
            try:
                state = pickle.load(f)
            except UnicodeDecodeError:  # written by Python 2
                f.seek(0)
                state = pickle.load(f, encoding="latin1")
        data = np.asarray(state["image_data"])
        class_dict = {
            (k.decode() if isinstance(k, bytes) else str(k)): [int(i) for i in v]
            for k, v in dict(state["class_dict"]).items()
        }
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise ValueError(f"image_data is {data.dtype} {list(data.shape)}, not uint8 [N,H,W,3]")
        for wnid, indices in class_dict.items():
            if any(not 0 <= i < len(data) for i in indices):
                raise ValueError(f"class {wnid} indexes past the {len(data)} images")
    except Exception as e:  # a pickle of any other shape
        raise InvalidArgument(
            "root",
            root,
            f"{path.name} is not a miniImageNet cache (a dict with uint8 image_data "
            f"[N, 84, 84, 3] and class_dict {{wnid: [indices]}}): {e}",
        ) from None
    class_dict = {w: sorted(ix) for w, ix in class_dict.items() if ix}
    if not class_dict:
        raise InvalidArgument("root", root, f"the {split} split (pickle layout) is empty")
    wnids = sorted(class_dict)
    counts = _equalize(split, {w: len(class_dict[w]) for w in wnids})
    index = np.array([class_dict[w][:counts] for w in wnids], dtype=np.int64)
    if data.shape[1:3] == (image_size, image_size):
        images = data[index.reshape(-1)].transpose(0, 3, 1, 2)
    else:
        images = np.stack([_to_chw(Image.fromarray(data[i]), image_size) for i in index.flat])
    shape = (len(wnids), counts, 3, image_size, image_size)
    return np.ascontiguousarray(images).reshape(shape), wnids
