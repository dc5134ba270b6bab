"""MNIST without torchvision: locate, verify, (optionally) download and load the four IDX files.

Files
-----
The loader needs the four standard IDX files, each either gzip-compressed (``NAME.gz``) or raw
(``NAME``): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``. When both forms are present the ``.gz`` one is used.

Integrity
---------
* ``.gz`` files must match the canonical MD5 checksums (:data:`GZ_MD5`) *and* pass the structural
  checks after decompression.
* Raw files have no canonical checksum here; they are validated structurally: magic number,
  28x28 images, exact file length, labels in 0..9, equal image and label counts. Any count is
  accepted for raw files (so small hand-made fixtures work); the canonical files have 60,000
  training and 10,000 test images.

Search order and behaviour
--------------------------
1. the explicit ``data_dir`` argument, 2. the ``MONQUANT_DATA`` environment variable,
3. the user cache ``$XDG_CACHE_HOME/monquant/mnist`` (default ``~/.cache/monquant/mnist``).

* An explicit location (1 or 2) that does not exist or holds none of the four files is skipped
  (and mentioned if nothing is found). One that holds at least one of the files but fails
  validation (a file missing, truncated, wrong checksum, bad structure) is an error: the user
  pointed at it, so silently using other data would hide the problem.
* The cache is ours: a corrupt or incomplete cache is not used. With ``download=True`` the
  missing or corrupt ``.gz`` files are (re-)downloaded into the cache; otherwise a
  :class:`~monquant.errors.DataError` says what is wrong with it.
* Downloads try each of :data:`MIRRORS` in turn with a short timeout, stream into a temporary file
  in the cache folder, verify the MD5 and only then atomically rename onto the final name, so the
  cache never holds a partial or corrupt download.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from monquant.errors import ConfigError, DataError

__all__ = [
    "ENV_VAR",
    "FILES",
    "GZ_MD5",
    "MEAN",
    "MIRRORS",
    "MNIST",
    "STD",
    "ImageSet",
    "default_cache_dir",
    "find_mnist",
    "iterate_batches",
    "load_mnist",
    "random_subset",
    "read_idx",
    "subset",
    "take_rows",
]

log = logging.getLogger(__name__)

ENV_VAR = "MONQUANT_DATA"
MEAN = 0.1307
STD = 0.3081
ROWS = COLS = 28

#: The four IDX files (without the ``.gz`` suffix), keyed by role.
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Canonical MD5 checksums of the gzip-compressed files.
GZ_MD5: dict[str, str] = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
}

#: Public mirrors of the ``.gz`` files, tried in order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

DOWNLOAD_TIMEOUT = 20.0  # seconds per blocking socket operation
_MAX_COMPRESSED = 32 << 20  # the largest .gz is ~9.5 MiB
_MAX_RAW = 64 << 20  # the largest raw file is ~45 MiB
_CHUNK = 1 << 20
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# ----------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------


class ImageSet:
    """Images kept as their ``uint8`` pixel codes, normalised on access.

    ``images[key]`` (an index tensor, a slice, an int) returns ``(codes[key] / 255 - MEAN) / STD``
    in ``dtype``: the same numbers as normalising the whole set up front, at a quarter of the
    memory of float32 (MNIST: 47 MB instead of 188 MB). ``shape``, ``device``, ``dtype`` and
    ``len`` behave like a tensor's; :meth:`tensor` materialises everything.
    """

    def __init__(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        if codes.dtype != torch.uint8 or codes.dim() != 2:
            raise ConfigError("ImageSet holds a 2-D uint8 tensor of pixel codes")
        self.codes = codes
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __getitem__(self, key) -> torch.Tensor:
        return self._normalised(self.codes[key])

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """``self[idx]`` for a 1-D tensor of non-negative row numbers, by ``index_select``
        (:func:`take_rows`)."""
        return self._normalised(self.codes.index_select(0, idx))

    def _normalised(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(self.dtype).div_(255.0).sub_(MEAN).div_(STD)

    def tensor(self) -> torch.Tensor:
        """All images as one normalised tensor."""
        return self[:]

    def to(self, device: torch.device | str) -> ImageSet:
        """The same images on ``device`` (the codes move; normalisation happens there)."""
        return ImageSet(self.codes.to(device), self.dtype)

    def __repr__(self) -> str:
        return f"ImageSet({tuple(self.shape)}, uint8 -> {self.dtype}, device={self.device})"


def take_rows(x: ImageSet | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows ``idx`` (a 1-D tensor of non-negative row numbers) of a tensor or an
    :class:`ImageSet`, as ``x[idx]`` gives them, by ``index_select``: on a CPU, advanced
    indexing of whole rows is an order of magnitude slower (``benchmarks/train_epoch.py``
    prints both for a batch of MNIST's pixel codes)."""
    if isinstance(x, ImageSet):
        return x.rows(idx)
    return x.index_select(0, idx)


@dataclass
class MNIST:
    """The whole of MNIST in memory: flattened images (normalised on access) and int64 labels.

    ``x_train`` / ``x_test`` are :class:`ImageSet` (or plain normalised tensors, for data built
    by hand): index them to get normalised float tensors.
    """

    x_train: ImageSet | torch.Tensor  # (N_train, 784); x[idx] = (pixel/255 - MEAN) / STD
    y_train: torch.Tensor  # (N_train,), int64 in 0..9
    x_test: ImageSet | torch.Tensor  # (N_test, 784)
    y_test: torch.Tensor  # (N_test,)
    source: Path  # folder the files were read from
    md5: dict[str, str] = field(default_factory=dict)  # file name -> MD5 of the file read

    def to(self, device: torch.device | str) -> MNIST:
        """The data set with every tensor on ``device``."""
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))  # fmt: skip

    def test_only(self) -> MNIST:
        """The data set with an empty training set, for work that reads only the test images:
        once the caller drops its own reference, the training images (47 MB of pixel codes)
        are freed."""
        none = torch.zeros(0, dtype=torch.long, device=self.y_train.device)
        return replace(self, x_train=take_rows(self.x_train, none), y_train=self.y_train[:0])

    def __repr__(self) -> str:
        return (
            f"MNIST(train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"dtype={self.x_train.dtype}, device={self.x_train.device}, source='{self.source}')"
        )


# ----------------------------------------------------------------------------------------------
# Locations
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/monquant/mnist``, or ``~/.cache/monquant/mnist`` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "monquant" / "mnist"


@dataclass
class _Place:
    """One location in the search order."""

    label: str
    path: Path | None
    explicit: bool


def _places(data_dir: str | os.PathLike[str] | None) -> list[_Place]:
    env = os.environ.get(ENV_VAR) or None
    return [
        _Place("data_dir argument", Path(data_dir).expanduser() if data_dir else None, True),
        _Place(f"${ENV_VAR}", Path(env).expanduser() if env else None, True),
        _Place("user cache", default_cache_dir(), False),
    ]


# ----------------------------------------------------------------------------------------------
# Checks on files
# ----------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pick_file(directory: Path, stem: str) -> Path | None:
    """``stem.gz`` if present, else the raw ``stem``, else ``None``."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _check_gz(path: Path) -> str | None:
    """Problem with a ``.gz`` file's checksum, or ``None`` when it matches."""
    expected = GZ_MD5.get(path.name)
    actual = _md5(path)
    if expected is None:
        return f"{path}: no known checksum for '{path.name}'"
    if actual != expected:
        return f"{path}: checksum mismatch (md5 {actual}, expected {expected}); file is corrupt"
    return None


def _check_raw(path: Path) -> str | None:
    """Cheap structural check of a raw file: header and exact length (labels fully parsed)."""
    try:
        if "labels" in path.name:
            _parse_idx(path.read_bytes(), path, labels=True)
            return None
        with path.open("rb") as fh:
            header = fh.read(16)
        _expect_length(header, path, labels=False, actual=path.stat().st_size)
    except DataError as exc:
        return str(exc)
    return None


def _check_dir(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Files found in ``directory`` (stem -> path) and the problems with them."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    for stem in FILES.values():
        path = _pick_file(directory, stem)
        if path is None:
            problems.append(f"{directory / stem}[.gz]: missing")
            continue
        found[stem] = path
        problem = _check_gz(path) if path.suffix == ".gz" else _check_raw(path)
        if problem:
            problems.append(problem)
    return found, problems


# ----------------------------------------------------------------------------------------------
# IDX parsing
# ----------------------------------------------------------------------------------------------


def _expect_length(data: bytes, path: Path, labels: bool, actual: int) -> int:
    """Validate magic and dimensions in ``data``'s header; return the item count.

    ``actual`` is the length of the whole (decompressed) file, checked against the header.
    """
    header_len = 8 if labels else 16
    kind = "label" if labels else "image"
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated: {actual} bytes, shorter than the {header_len}-byte IDX {kind} "
            "header"
        )
    fields = np.frombuffer(data[:header_len], dtype=">u4")
    magic, count = int(fields[0]), int(fields[1])
    want = _LABEL_MAGIC if labels else _IMAGE_MAGIC
    if magic != want:
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x} (expected 0x{want:08x} for an IDX {kind} "
            "file); not an MNIST file or corrupt"
        )
    item = 1
    if not labels:
        rows, cols = int(fields[2]), int(fields[3])
        if (rows, cols) != (ROWS, COLS):
            raise DataError(f"{path}: images are {rows}x{cols}, expected {ROWS}x{COLS}")
        item = ROWS * COLS
    expected = header_len + count * item
    if actual < expected:
        raise DataError(
            f"{path}: truncated: header announces {count} {kind}s ({expected} bytes), "
            f"file has {actual} bytes"
        )
    if actual > expected:
        raise DataError(
            f"{path}: {actual - expected} unexpected trailing bytes after {count} {kind}s"
        )
    return count


def _parse_idx(data: bytes, path: Path, labels: bool) -> np.ndarray:
    """Validated array of an IDX file's contents: ``(N,)`` labels or ``(N, 784)`` images."""
    count = _expect_length(data, path, labels, actual=len(data))
    if labels:
        arr = np.frombuffer(data, dtype=np.uint8, offset=8)
        if count and int(arr.max()) > 9:
            raise DataError(f"{path}: label {int(arr.max())} out of range 0..9")
        return arr
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, ROWS * COLS)


def _read_bytes(path: Path) -> bytes:
    """Whole (decompressed) contents of ``path``, with a size cap and clean errors."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read(_MAX_RAW + 1)
        else:
            with path.open("rb") as fh:
                data = fh.read(_MAX_RAW + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read or decompressed ({exc}); file is corrupt") from exc
    if len(data) > _MAX_RAW:
        raise DataError(f"{path}: larger than {_MAX_RAW} bytes once decompressed; not MNIST")
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and validate one MNIST IDX file (``.gz`` or raw) into a ``uint8`` array.

    Labels come back as ``(N,)``, images as ``(N, 784)``; the kind is taken from the file name
    (``labels`` in it means a label file). Raises :class:`DataError` for any defect.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path, labels="labels" in path.name)


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def _fetch(url: str, directory: Path, name: str) -> None:
    """Download ``url`` into ``directory/name`` via a verified temporary file."""
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
            for chunk in iter(lambda: r.read(_CHUNK), b""):
                size += len(chunk)
                if size > _MAX_COMPRESSED:
                    raise DataError(f"{url}: response larger than {_MAX_COMPRESSED} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != GZ_MD5[name]:
            raise DataError(f"{url}: checksum mismatch (md5 {digest.hexdigest()})")
        os.replace(tmp, directory / name)
    finally:
        tmp.unlink(missing_ok=True)


def _download_file(directory: Path, name: str) -> None:
    """Fetch ``name`` from the first mirror that serves it intact, or raise :class:`DataError`."""
    failures = []
    for mirror in MIRRORS:
        url = mirror + name
        log.info("downloading %s", url)
        try:
            _fetch(url, directory, name)
            return
        except (OSError, ValueError, http.client.HTTPException, DataError) as exc:
            failures.append(f"{url}: {exc}")
    raise DataError(f"could not download {name}:\n  " + "\n  ".join(failures))


def _download_missing(directory: Path) -> None:
    """(Re-)download every ``.gz`` file that the cache lacks or holds corrupt."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {directory}: {exc}") from exc
    for stem in FILES.values():
        gz = directory / f"{stem}.gz"
        if gz.is_file() and _check_gz(gz) is None:
            continue
        raw = directory / stem
        if not gz.is_file() and raw.is_file() and _check_raw(raw) is None:
            continue
        _download_file(directory, f"{stem}.gz")


# ----------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------


def _how_to(cache: Path) -> str:
    names = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    return (
        f"MNIST needs the four IDX files (gzip-compressed or raw): {names}.\n"
        "Provide them in one of these ways:\n"
        "  - pass --data-dir DIR on the command line (data_dir=DIR in Python),\n"
        f"  - set the environment variable {ENV_VAR}=DIR,\n"
        f"  - put them in the cache folder {cache},\n"
        "  - or allow downloading (download=True; needs network access) from " + ", ".join(MIRRORS)
    )


def _not_found(notes: list[str], cache: Path, reason: str) -> DataError:
    searched = "\n".join(f"  - {note}" for note in notes)
    return DataError(f"MNIST not found ({reason}). Searched:\n{searched}\n{_how_to(cache)}")


def _inspect(place: _Place, notes: list[str]) -> Path | None:
    """The place's folder if it holds four valid files; records a note otherwise.

    Raises :class:`DataError` for an explicit place that holds some files that are not valid.
    """
    if place.path is None:
        notes.append(f"{place.label}: not given")
        return None
    if not place.path.is_dir():
        notes.append(f"{place.label}: {place.path} (no such folder)")
        return None
    found, problems = _check_dir(place.path)
    if not problems:
        return place.path
    if not found:
        notes.append(f"{place.label}: {place.path} (none of the files)")
        return None
    detail = "\n    ".join(problems)
    if place.explicit:
        raise DataError(
            f"MNIST files in {place.path} (from the {place.label}) are not usable:\n    {detail}"
            "\nFix or remove them, or point elsewhere. Note: .gz files must be the canonical "
            "downloads; if you compressed them yourself, provide them uncompressed instead."
        )
    notes.append(f"{place.label}: {place.path} (not used:\n    {detail})")
    return None


def find_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Folder holding four valid MNIST files; downloads into the cache if needed and allowed.

    Searches ``data_dir``, then ``$MONQUANT_DATA``, then the user cache. A missing or empty
    explicit folder is skipped; an explicit folder holding files that fail validation raises
    :class:`DataError` (it is never silently replaced by other data). A corrupt or incomplete
    cache is not used: with ``download`` its missing/corrupt ``.gz`` files are fetched again,
    otherwise :class:`DataError` reports what is wrong, every place searched and how to provide
    the files. See the module docstring for details.
    """
    places = _places(data_dir)
    notes: list[str] = []
    for place in places:
        folder = _inspect(place, notes)
        if folder is not None:
            return folder
    cache = places[-1].path
    assert cache is not None
    if not download:
        raise _not_found(notes, cache, "download disabled")
    try:
        _download_missing(cache)
    except DataError as exc:
        raise _not_found(notes, cache, f"download failed: {exc}") from exc
    _, problems = _check_dir(cache)
    if problems:
        raise _not_found(notes, cache, "downloaded files are unusable: " + "; ".join(problems))
    return cache


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _to_images(arr: np.ndarray, device: str | torch.device, dtype: torch.dtype) -> ImageSet:
    return ImageSet(torch.from_numpy(arr.copy()).to(device=device), dtype)


def _load_split(
    folder: Path, split: str, device: str | torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    paths = {kind: _pick_file(folder, FILES[f"{split}_{kind}"]) for kind in ("images", "labels")}
    if paths["images"] is None or paths["labels"] is None:
        raise DataError(f"{folder}: the {split} files disappeared while loading")
    images = read_idx(paths["images"])
    labels = read_idx(paths["labels"])
    if len(images) != len(labels):
        raise DataError(
            f"{folder}: {split} split has {len(images)} images but {len(labels)} labels"
        )
    md5 = {path.name: _md5(path) for path in paths.values() if path is not None}
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return _to_images(images, device, dtype), y, md5


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MNIST:
    """Load the whole of MNIST into memory.

    Images are flattened to 784 values and kept as ``uint8`` codes in an :class:`ImageSet`;
    indexing returns them scaled to [0, 1] and normalised with ``(x - MEAN) / STD``
    (0.1307, 0.3081) in ``dtype``; labels are int64. ``data_dir`` and ``download`` work as
    in :func:`find_mnist` (see the module docstring). Raises :class:`DataError` on any problem.
    """
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating dtype, got {dtype}")
    folder = find_mnist(data_dir, download)
    x_train, y_train, md5 = _load_split(folder, "train", device, dtype)
    x_test, y_test, md5_test = _load_split(folder, "test", device, dtype)
    return MNIST(x_train, y_train, x_test, y_test, folder, {**md5, **md5_test})


# ----------------------------------------------------------------------------------------------
# Batches and subsets
# ----------------------------------------------------------------------------------------------


def _check_pair(x: ImageSet | torch.Tensor, y: torch.Tensor) -> int:
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    return int(x.shape[0])


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` mini-batches covering one epoch.

    With ``shuffle`` the order is one ``torch.randperm`` drawn from ``generator`` (required then),
    so a seeded generator gives a reproducible order and each epoch (each call) draws a new one.
    Without ``shuffle`` the batches are consecutive slices. ``drop_last`` skips a final short batch.
    """
    n = _check_pair(x, y)
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if shuffle and generator is None:
        raise ConfigError("shuffle=True needs a torch.Generator (seed it for reproducibility)")
    order = None
    if shuffle:
        assert generator is not None
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield take_rows(x, idx), take_rows(y, idx.to(y.device))


def subset(x: torch.Tensor, y: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` samples (all of them when ``k`` is ``None`` or larger than the set).

    The one "first k samples" rule of every ``--test-limit K``, ``--train-limit K``,
    ``--calibration-limit K`` and study limit.
    """
    _check_pair(x, y)
    if k is None:
        return x, y
    if k < 0:
        raise ConfigError(f"k must be non-negative, got {k}")
    return x[:k], y[:k]


def random_subset(
    x: ImageSet | torch.Tensor, y: torch.Tensor, k: int, seed: int, keep_codes: bool = False
) -> tuple[ImageSet | torch.Tensor, torch.Tensor]:
    """``k`` samples drawn without replacement, reproducibly from ``seed`` (order is random).

    ``keep_codes``: from an :class:`ImageSet`, an ImageSet of the drawn rows (their pixel codes,
    normalised on access to the same numbers) instead of the normalised rows: a quarter of the
    memory, for a training set that the training loop reads batch by batch."""
    n = _check_pair(x, y)
    if not 0 <= k <= n:
        raise ConfigError(f"k must be in 0..{n}, got {k}")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=generator)[:k].to(x.device)
    if keep_codes and isinstance(x, ImageSet):
        return ImageSet(x.codes.index_select(0, idx), x.dtype), take_rows(y, idx.to(y.device))
    return take_rows(x, idx), take_rows(y, idx.to(y.device))
