"""Omniglot: checked archives, decoded once into a cached uint8 tensor, and the standard splits.

``load_omniglot`` reads the two official zips (``images_background.zip``, 964 characters of 30
alphabets; ``images_evaluation.zip``, 659 characters of 20 alphabets; 20 drawings of each
character, 105x105 1-bit PNG) straight from the zip files, resizes every drawing to
``image_size`` and keeps the result as one tensor ``images [1623, 20, image_size, image_size]``.

Order (fixed, independent of the file system): characters by split (background, then
evaluation), then alphabet folder name, then character folder name (``character01`` ...), all
sorted as plain strings; the 20 drawings of a character by file name (``XXXX_01`` ... ``XXXX_20``,
i.e. by drawer).

Pixels: ``uint8``, ink = 255, background = 0 (the PNGs store white paper as 1, so they are
inverted); divide by 255 for the ``[0, 1]`` inputs of the reference code, which also inverted
(``1.0 - image``) so that strokes are bright.

Resizing: ``resample="lanczos"`` (default) converts to greyscale and resizes with Pillow's
LANCZOS filter (the old ``ANTIALIAS``), giving anti-aliased strokes. The MAML reference
preprocessing called ``im.resize((28, 28), resample=Image.LANCZOS)`` on the mode ``"1"`` image, and
Pillow ignores the filter for mode ``"1"`` and uses nearest-neighbour, so its images were binary;
``resample="nearest"`` reproduces that exactly.

Splits (``paper_split``, ``background_split``) are LongTensors of character indices into
``images``. Rotations by 90, 180 and 270 degrees (MAML paper, after Santoro et al. 2016) are the
task sampler's job (``tasks.classification.ImageClasses``).

References:
    Lake, Salakhutdinov & Tenenbaum (2015), "Human-level concept learning through probabilistic
    program induction", Science 350(6266); data: https://github.com/brendenlake/omniglot.
    Finn, Abbeel & Levine (2017), §5.2; reference code github.com/cbfinn/maml
    (``data/omniglot_resized/resize_images.py``, ``data_generator.py``).
    Santoro et al. (2016), "Meta-learning with memory-augmented neural networks".
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maml_runner.data import archives
from maml_runner.errors import InvalidArgument, UserError, choose, positive_int, require

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
BACKGROUND_ZIP = "images_background.zip"
EVALUATION_ZIP = "images_evaluation.zip"
ARCHIVES = (BACKGROUND_ZIP, EVALUATION_ZIP)
OFFICIAL_MD5 = {
    BACKGROUND_ZIP: "68d2efa1b9178cc56df9314c21c6e718",
    EVALUATION_ZIP: "6b91aef0f799c5bb55b94e3f2daec811",
}
CHECKSUM_FILE = "SHA256SUMS"

NUM_CHARACTERS = 1623
NUM_BACKGROUND = 964
NUM_DRAWINGS = 20
ORIGINAL_SIZE = 105
RESAMPLE = ("lanczos", "nearest")
FORMAT = 1  # bump when the decoded content or the cache layout changes

_PNG = re.compile(r"^(images_background|images_evaluation)/([^/]+)/([^/]+)/(\d+)_(\d+)\.png$")


@dataclass
class OmniglotData:
    """The decoded Omniglot set, one row per character.

    Attributes:
        images: ``uint8 [C, 20, S, S]``, ink 255 on 0; ``C`` = 1623 for the full set.
        alphabets: alphabet folder name of each character.
        character_ids: global character id of each character (``XXXX`` in the file names;
            1..964 background, 965..1623 evaluation; not in row order).
        background: ``bool [C]``, True for characters of ``images_background``.
    """

    images: torch.Tensor
    alphabets: list[str]
    character_ids: list[int]
    background: torch.Tensor

    @property
    def num_characters(self) -> int:
        return self.images.shape[0]


def load_omniglot(
    root: str | Path | None,
    *,
    cache_dir: Path,
    download: bool = False,
    image_size: int = 28,
    base_url: str = OFFICIAL_URL,
    resample: str = "lanczos",
    md5s: Mapping[str, str] = OFFICIAL_MD5,
) -> OmniglotData:
    """Check the archives in ``root``, then load the decoded set from cache or decode it.

    Each zip is checked against ``root/SHA256SUMS`` when that file lists it (a rebuilt copy, such
    as the project's shared one), else against ``md5s`` (the official archives' md5).

    Args:
        root: folder holding ``images_background.zip`` and ``images_evaluation.zip``; ``None``
            means ``cache_dir/omniglot``.
        cache_dir: where ``omniglot_{image_size}px_{key}.pt`` is kept; ``key`` hashes the
            archives' sha256, ``image_size``, ``resample`` and ``FORMAT``. A folder that cannot
            be written costs only the cache: one warning line, and the decoded set is returned.
        download: fetch missing archives from ``base_url`` into ``root`` (md5-checked).
        image_size: side of the square images after resizing (105 keeps the originals).
        base_url: folder URL the archive names are appended to (``http(s)://`` or ``file://``).
        resample: ``"lanczos"`` (anti-aliased) or ``"nearest"`` (what the MAML reference got).
        md5s: expected md5 of each archive when no SHA256SUMS entry applies.

    Raises:
        InvalidArgument: ``image_size`` not an integer >= 1, ``resample`` not in ``RESAMPLE``;
            ``root``: an archive is missing (and ``download`` is off) or fails its checksum.
        UserError: a download fails, or an archive does not have the Omniglot layout (the
            message names the file).
    """
    positive_int("image_size", image_size)
    choose("resample", resample, RESAMPLE)
    cache_dir = Path(cache_dir).expanduser()
    paths = _find_archives(
        root, cache_dir=cache_dir, download=download, base_url=base_url, md5s=md5s
    )
    digests = _verify(paths, md5s)
    key = _cache_key(digests, image_size, resample)
    cache = cache_dir / f"omniglot_{image_size}px_{key}.pt"
    data = _load_cache(cache, image_size)
    if data is None:
        start = time.perf_counter()
        data = decode(paths, image_size=image_size, resample=resample)
        log.info("decoded Omniglot in %.1f s", time.perf_counter() - start)
        _save_cache(cache, data)
    return data


def _find_archives(
    root: str | Path | None,
    *,
    cache_dir: Path,
    download: bool,
    base_url: str,
    md5s: Mapping[str, str],
) -> list[Path]:
    names = " and ".join(ARCHIVES)
    unset = root is None or str(root) == ""
    folder = cache_dir / "omniglot" if unset else Path(root).expanduser()
    paths = [folder / name for name in ARCHIVES]
    for path in paths:
        if path.is_file():
            continue
        if not download:
            if unset:
                missing = f"the default folder {folder} has no {path.name}"
            else:
                missing = f"{path.name} is missing"
            raise InvalidArgument(
                "root",
                None if unset else folder,
                f"{missing}; point root at a folder holding {names} "
                f"(from {OFFICIAL_URL}), or turn download on",
            )
        url = base_url if base_url.endswith("/") else base_url + "/"
        log.info("downloading %s to %s", url + path.name, folder)
        archives.download(url + path.name, path, md5=md5s.get(path.name))
    return paths


def _verify(paths: Sequence[Path], md5s: Mapping[str, str]) -> dict[str, str]:
    """Check every archive; return ``{name: sha256}`` (the cache key's input)."""
    root = paths[0].parent
    listed = root / CHECKSUM_FILE
    sums = archives.read_checksum_file(listed) if listed.is_file() else {}
    digests = {}
    for path in paths:
        sha = archives.sha256sum(path)
        if path.name in sums:
            if sha != sums[path.name]:
                raise InvalidArgument(
                    "root",
                    root,
                    f"{path.name} fails its sha256 check against {CHECKSUM_FILE} (expected "
                    f"{sums[path.name]}, got {sha}); the file is corrupt or not the one listed "
                    "there",
                )
        elif path.name in md5s:
            md5 = archives.md5sum(path)
            if md5 != md5s[path.name].lower():
                raise InvalidArgument(
                    "root",
                    root,
                    f"{path.name} fails the official md5 check (expected "
                    f"{md5s[path.name].lower()}, got {md5}); replace it with the official archive "
                    f"(delete it and turn download on), or list a rebuilt copy's sha256 in "
                    f"{CHECKSUM_FILE} beside it",
                )
        else:
            raise InvalidArgument(
                "root",
                root,
                f"no checksum known for {path.name}; list its sha256 in {CHECKSUM_FILE} beside it",
            )
        digests[path.name] = sha
    return digests


def _cache_key(digests: Mapping[str, str], image_size: int, resample: str) -> str:
    text = f"omniglot-format{FORMAT}|{image_size}|{resample}|" + "|".join(
        f"{name}={digests[name]}" for name in sorted(digests)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _load_cache(path: Path, image_size: int) -> OmniglotData | None:
    """The cached set, or ``None`` when absent or unreadable (then it is rebuilt)."""

    def parse(state: dict) -> OmniglotData:
        images, background = state["images"], state["background"]
        alphabets, ids = list(state["alphabets"]), [int(i) for i in state["character_ids"]]
        c = images.shape[0]
        if (
            images.dtype != torch.uint8
            or tuple(images.shape[1:]) != (NUM_DRAWINGS, image_size, image_size)
            or background.dtype != torch.bool
            or tuple(background.shape) != (c,)
            or len(alphabets) != c
            or len(ids) != c
        ):
            raise ValueError("unexpected shapes or dtypes")
        return OmniglotData(images, alphabets, ids, background)

    return archives.read_cache(path, FORMAT, parse, "Omniglot")


def _save_cache(path: Path, data: OmniglotData) -> None:
    state = {
        "images": data.images,
        "alphabets": data.alphabets,
        "character_ids": data.character_ids,
        "background": data.background,
    }
    archives.write_cache(path, state, FORMAT)


def decode(
    paths: Sequence[Path], *, image_size: int = 28, resample: str = "lanczos"
) -> OmniglotData:
    """Decode the PNGs of the zips in ``paths`` (background first) without extracting them.

    Args:
        paths: the archives, in split order; each holds ``<split>/<alphabet>/<character>/
            XXXX_YY.png`` with ``<split>`` its own stem.
        image_size: output side; ``resample`` as in ``load_omniglot``.

    Raises:
        UserError: an archive is not a readable zip, holds no drawings, has a member that cannot
            be decoded (the message names the archive and the member), or a character does not
            have exactly 20 drawings of one character id.
    """
    from PIL import Image

    flt = Image.Resampling.LANCZOS if resample == "lanczos" else Image.Resampling.NEAREST
    size = (image_size, image_size)
    blocks, alphabets, ids, background = [], [], [], []
    for path in paths:
        try:
            with zipfile.ZipFile(path) as zf:
                groups = _characters(zf, path)
                out = np.empty((len(groups), NUM_DRAWINGS, image_size, image_size), np.uint8)
                for i, ((split, alphabet, _), members) in enumerate(sorted(groups.items())):
                    ids.append(_character_id(members, path))
                    alphabets.append(alphabet)
                    background.append(split == "images_background")
                    for j, name in enumerate(sorted(members)):
                        out[i, j] = _drawing(zf, name, path, size, flt, resample == "lanczos")
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{path}: not a readable Omniglot zip ({e})") from None
        np.subtract(255, out, out=out)  # ink bright: white paper (255) -> 0
        blocks.append(torch.from_numpy(out))
    return OmniglotData(
        torch.cat(blocks), alphabets, ids, torch.tensor(background, dtype=torch.bool)
    )


def _drawing(
    zf: zipfile.ZipFile, name: str, path: Path, size: tuple[int, int], flt: int, grey_first: bool
) -> np.ndarray:
    """Member ``name`` of the zip at ``path`` as ``uint8 [S, S]`` (paper white, not inverted).

    A member whose deflate stream, CRC or PNG is damaged is a ``UserError`` naming the archive
    and the member (``zlib.error``, ``BadZipFile``, ``EOFError`` or Pillow's ``OSError``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(zf.read(name))) as im:
            if grey_first:  # lanczos: filter the greyscale image, not the 1-bit one
                im = im.convert("L")
            if im.size != size:
                im = im.resize(size, flt)
            return np.asarray(im.convert("L"))
    except (zlib.error, zipfile.BadZipFile, EOFError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, UnidentifiedImageError):
            reason = "not a PNG image"  # its text names only an io.BytesIO object
        else:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(
            f"{path}: member {name} cannot be decoded ({reason}); the archive is damaged: "
            f"replace it with an intact copy (the official one: delete it and turn download on)"
        ) from None


def _characters(zf: zipfile.ZipFile, path: Path) -> dict[tuple[str, str, str], list[str]]:
    """Group the zip's PNG members by ``(split, alphabet, character folder)``."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name in zf.namelist():
        m = _PNG.match(name)
        if m is None or m.group(1) != path.stem:
            continue
        groups.setdefault(m.group(1, 2, 3), []).append(name)
    if not groups:
        raise UserError(f"{path}: no {path.stem}/<alphabet>/<character>/XXXX_YY.png inside")
    return groups


def _character_id(members: list[str], path: Path) -> int:
    folder = members[0].rsplit("/", 1)[0]
    found = {int(_PNG.match(name).group(4)) for name in members}  # type: ignore[union-attr]
    if len(members) != NUM_DRAWINGS or len(found) != 1:
        raise UserError(
            f"{path}: {folder} has {len(members)} drawings of ids {sorted(found)}; "
            f"expected {NUM_DRAWINGS} drawings of one character"
        )
    return found.pop()


def paper_split(
    num_chars: int = NUM_CHARACTERS, seed: int = 1, *, num_train: int = 1200, num_val: int = 100
) -> dict[str, torch.Tensor]:
    """The MAML paper's split: all characters shuffled, 1200 for meta-training, the rest test.

    As in the reference code (``random.seed(1); random.shuffle(character_folders)``), the
    characters are shuffled with Python's ``random`` and a fixed seed; of the first
    ``num_train`` the last ``num_val`` are held out for validation. Defaults: 1100 train, 100
    val, 423 test. The shuffle is of our fixed character order, whereas the reference shuffled
    an ``os.listdir`` order, so the exact characters of its split cannot be recovered.

    Rotations are not applied here: the task sampler adds the 90/180/270 degree rotations of
    each class of a task (see ``tasks.classification.ImageClasses``).

    Returns:
        ``{"train", "val", "test"}``: LongTensors of character indices (in shuffled order).

    Raises:
        InvalidArgument: unless ``0 <= num_val <= num_train <= num_chars`` (integers).
    """
    positive_int("num_train", num_train, minimum=0)
    require(
        num_train <= num_chars,
        "num_train",
        num_train,
        f"there are {num_chars} characters; choose num_train <= {num_chars}",
    )
    positive_int("num_val", num_val, minimum=0)
    require(
        num_val <= num_train,
        "num_val",
        num_val,
        f"validation characters come out of num_train ({num_train}); choose num_val <= {num_train}",
    )
    order = list(range(num_chars))
    random.Random(seed).shuffle(order)
    perm = torch.tensor(order, dtype=torch.long)
    cut = num_train - num_val
    return {"train": perm[:cut], "val": perm[cut:num_train], "test": perm[num_train:]}


def background_split(
    data: OmniglotData, val_alphabets: int | Sequence[str] = 5
) -> dict[str, torch.Tensor]:
    """Lake et al.'s split: background alphabets for meta-training/validation, evaluation for test.

    Validation holds out whole background alphabets, by default the last 5 in sorted order
    (``Ojibwe_(Canadian_Aboriginal_Syllabics)``, ``Sanskrit``, ``Syriac_(Estrangelo)``,
    ``Tagalog``, ``Tifinagh``: 25 train alphabets, 5 val, 20 test), so no alphabet is shared.

    Args:
        data: the loaded set.
        val_alphabets: how many background alphabets (the last in sorted order) to hold out, or
            their names.

    Returns:
        ``{"train", "val", "test"}``: ascending LongTensors of character indices.

    Raises:
        InvalidArgument: ``val_alphabets`` is a count outside ``0..alphabets - 1`` or names an
            alphabet that is not a background one.
    """
    background = data.background.tolist()
    names = sorted({a for a, b in zip(data.alphabets, background) if b})
    if isinstance(val_alphabets, int):
        require(
            0 <= val_alphabets < len(names),
            "val_alphabets",
            val_alphabets,
            f"must be 0 to {len(names) - 1} (there are {len(names)} background alphabets)",
        )
        held = set(names[len(names) - val_alphabets :])
    else:
        held = set(val_alphabets)
        unknown = sorted(held - set(names))
        require(
            not unknown,
            "val_alphabets",
            list(val_alphabets),
            f"{unknown} are not background alphabets; choose from {names}",
        )
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, (alphabet, bg) in enumerate(zip(data.alphabets, background)):
        split["test" if not bg else "val" if alphabet in held else "train"].append(i)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in split.items()}
