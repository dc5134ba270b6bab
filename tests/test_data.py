"""Tests of the MNIST loader: real files (when present), synthetic IDX files, errors, batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from monquant import data
from monquant.data import (
    FILES,
    MEAN,
    STD,
    find_mnist,
    iterate_batches,
    load_mnist,
    random_subset,
    subset,
)
from monquant.errors import DataError, MonquantError

REAL_MNIST = Path("/work/shared/data/mnist")
N_TRAIN, N_TEST = 12, 5


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real cache or a user's MONQUANT_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("MONQUANT_DATA", raising=False)


def _images_bytes(pixels: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x803, len(pixels), 28, 28) + pixels.astype(np.uint8).tobytes()


def _labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def _synthetic_contents(seed: int = 0) -> dict[str, tuple[bytes, np.ndarray]]:
    """File stem -> (raw IDX bytes, the array it encodes)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        out[FILES[f"{split}_images"]] = (_images_bytes(pixels), pixels)
        out[FILES[f"{split}_labels"]] = (_labels_bytes(labels), labels)
    return out


def _write_set(folder: Path, gz: bool, seed: int = 0) -> dict[str, tuple[bytes, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    contents = _synthetic_contents(seed)
    for stem, (raw, _) in contents.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / stem).write_bytes(raw)
    return contents


def _trust_gz(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the synthetic .gz files in ``folder`` the 'canonical' ones."""
    table = {
        f"{stem}.gz": hashlib.md5((folder / f"{stem}.gz").read_bytes()).hexdigest()
        for stem in FILES.values()
    }
    monkeypatch.setattr(data, "GZ_MD5", table)


def _expected_images(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels.astype(np.float32)) / 255.0 - MEAN) / STD


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="real MNIST files not present")


@pytest.fixture(scope="module")
def real() -> data.MNIST:
    return load_mnist(REAL_MNIST, download=False)


@needs_real
def test_real_mnist_shapes_and_normalisation(real: data.MNIST) -> None:
    assert real.x_train.shape == (60000, 784) and real.x_test.shape == (10000, 784)
    assert real.x_train.dtype == torch.float32 and real.y_train.dtype == torch.int64
    assert real.y_train.shape == (60000,) and real.y_test.shape == (10000,)
    for y in (real.y_train, real.y_test):
        assert int(y.min()) == 0 and int(y.max()) == 9
    x = real.x_train.tensor()
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01
    assert float(x.min()) == pytest.approx(-MEAN / STD, abs=1e-5)
    assert real.source == REAL_MNIST
    assert real.md5 == data.GZ_MD5


@needs_real
def test_real_mnist_found_through_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONQUANT_DATA", str(REAL_MNIST))
    assert find_mnist(download=False) == REAL_MNIST


# ----------------------------------------------------------------------------------------------
# Synthetic files
# ----------------------------------------------------------------------------------------------


def test_synthetic_raw_files_load(tmp_path: Path) -> None:
    contents = _write_set(tmp_path / "raw", gz=False)
    mnist = load_mnist(tmp_path / "raw", download=False)
    assert mnist.x_train.shape == (N_TRAIN, 784) and mnist.x_test.shape == (N_TEST, 784)
    pixels = contents[FILES["train_images"]][1]
    torch.testing.assert_close(mnist.x_train.tensor(), _expected_images(pixels))
    labels = contents[FILES["test_labels"]][1]
    assert mnist.y_test.tolist() == labels.tolist()
    assert set(mnist.md5) == set(FILES.values())


def test_test_only_keeps_the_test_set_and_lets_the_training_images_go(tmp_path: Path) -> None:
    import gc
    import weakref

    _write_set(tmp_path / "raw", gz=False)
    mnist = load_mnist(tmp_path / "raw", download=False)
    codes = weakref.ref(mnist.x_train.codes)
    kept = mnist.test_only()
    assert kept.x_train.shape == (0, 784) and kept.y_train.shape == (0,)
    assert kept.x_train.dtype == mnist.x_train.dtype and kept.y_train.dtype == torch.int64
    assert kept.x_test is mnist.x_test and kept.y_test is mnist.y_test
    assert kept.source == mnist.source and kept.md5 == mnist.md5
    del mnist
    gc.collect()
    assert codes() is None  # nothing of the result holds the training images


def test_synthetic_gz_files_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "gz"
    contents = _write_set(folder, gz=True, seed=1)
    _trust_gz(folder, monkeypatch)
    mnist = load_mnist(folder, download=False, dtype=torch.float64)
    assert mnist.x_test.dtype == torch.float64
    pixels = contents[FILES["test_images"]][1]
    torch.testing.assert_close(
        mnist.x_test.tensor(), _expected_images(pixels).double(), atol=1e-6, rtol=0
    )
    assert mnist.y_train.tolist() == contents[FILES["train_labels"]][1].tolist()
    assert set(mnist.md5) == {f"{stem}.gz" for stem in FILES.values()}


def test_gz_preferred_over_raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "both"
    _write_set(folder, gz=False, seed=2)
    contents = _write_set(folder, gz=True, seed=3)
    _trust_gz(folder, monkeypatch)
    mnist = load_mnist(folder, download=False)
    assert mnist.y_train.tolist() == contents[FILES["train_labels"]][1].tolist()


def test_env_var_used_when_data_dir_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_set(tmp_path / "env", gz=False)
    monkeypatch.setenv("MONQUANT_DATA", str(tmp_path / "env"))
    assert find_mnist(tmp_path / "does-not-exist", download=False) == tmp_path / "env"


# ----------------------------------------------------------------------------------------------
# Corrupt files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", [FILES["train_images"], FILES["test_labels"]])
def test_truncated_raw_file_names_it(tmp_path: Path, stem: str) -> None:
    _write_set(tmp_path, gz=False)
    path = tmp_path / stem
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated") as info:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(info.value)


def test_truncated_gz_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_set(tmp_path, gz=True)
    path = tmp_path / f"{FILES['train_images']}.gz"
    path.write_bytes(path.read_bytes()[:-100])
    _trust_gz(tmp_path, monkeypatch)  # checksum passes: the decompression must catch it
    with pytest.raises(DataError, match="corrupt") as info:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(info.value)


def test_short_header_is_truncated(tmp_path: Path) -> None:
    _write_set(tmp_path, gz=False)
    (tmp_path / FILES["train_labels"]).write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path, download=False)


def test_wrong_magic(tmp_path: Path) -> None:
    _write_set(tmp_path, gz=False)
    path = tmp_path / FILES["test_images"]
    raw = bytearray(path.read_bytes())
    raw[3] = 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic") as info:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(info.value)


def test_label_out_of_range(tmp_path: Path) -> None:
    _write_set(tmp_path, gz=False)
    path = tmp_path / FILES["train_labels"]
    path.write_bytes(_labels_bytes(np.array([3] * (N_TRAIN - 1) + [11])))
    with pytest.raises(DataError, match="out of range"):
        load_mnist(tmp_path, download=False)


def test_count_mismatch(tmp_path: Path) -> None:
    _write_set(tmp_path, gz=False)
    (tmp_path / FILES["train_labels"]).write_bytes(_labels_bytes(np.zeros(N_TRAIN + 1)))
    with pytest.raises(DataError, match="images but"):
        load_mnist(tmp_path, download=False)


def test_explicit_dir_with_partial_set_is_error(tmp_path: Path) -> None:
    _write_set(tmp_path, gz=False)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match="missing"):
        find_mnist(tmp_path, download=False)


def test_corrupt_cached_gz_not_used(tmp_path: Path) -> None:
    cache = data.default_cache_dir()
    assert cache.is_relative_to(tmp_path)
    _write_set(cache, gz=True)  # right names, wrong contents -> md5 mismatch
    with pytest.raises(DataError, match="checksum mismatch") as info:
        load_mnist(download=False)
    assert "download disabled" in str(info.value)


def test_nothing_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONQUANT_DATA", str(tmp_path / "env-empty"))
    with pytest.raises(MonquantError) as info:
        load_mnist(tmp_path / "arg-empty", download=False)
    message = str(info.value)
    assert isinstance(info.value, DataError)
    for stem in FILES.values():
        assert stem in message
    for where in ("arg-empty", "env-empty", str(data.default_cache_dir()), "MONQUANT_DATA"):
        assert where in message
    assert "--data-dir" in message


# ----------------------------------------------------------------------------------------------
# Download (with a fake network)
# ----------------------------------------------------------------------------------------------


def _fake_network(served: dict[str, bytes], log: list[str]):
    def urlopen(url: str, timeout: float) -> io.BytesIO:
        log.append(url)
        assert timeout <= 60
        if url not in served:
            raise urllib.error.URLError("offline")
        return io.BytesIO(served[url])

    return urlopen


def test_download_verifies_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "server"
    contents = _write_set(source, gz=True, seed=4)
    _trust_gz(source, monkeypatch)
    first, second = data.MIRRORS
    served = {}
    for stem in FILES.values():
        served[first + f"{stem}.gz"] = b"garbage"  # first mirror serves corrupt data
        served[second + f"{stem}.gz"] = (source / f"{stem}.gz").read_bytes()
    cache = data.default_cache_dir()
    cache.mkdir(parents=True)
    (cache / f"{FILES['train_images']}.gz").write_bytes(b"stale corrupt file")
    log: list[str] = []
    monkeypatch.setattr(data.urllib.request, "urlopen", _fake_network(served, log))
    mnist = load_mnist(download=True)
    assert mnist.source == cache
    assert mnist.y_test.tolist() == contents[FILES["test_labels"]][1].tolist()
    assert len(log) == 8  # every file: the corrupt mirror, then the good one
    assert sorted(os.listdir(cache)) == sorted(f"{stem}.gz" for stem in FILES.values())


def test_download_failure_leaves_no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.urllib.request, "urlopen", _fake_network({}, []))
    with pytest.raises(DataError, match="download failed") as info:
        load_mnist(download=True)
    assert "offline" in str(info.value)
    assert os.listdir(data.default_cache_dir()) == []


# ----------------------------------------------------------------------------------------------
# Batches and subsets
# ----------------------------------------------------------------------------------------------


def _toy(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return x, torch.arange(n)


def _epoch(seed: int, **kwargs) -> list[torch.Tensor]:
    x, y = _toy()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for xb, yb in iterate_batches(x, y, 5, gen, **kwargs):
        assert torch.equal(xb[:, 0].long(), yb)  # rows and labels stay paired
        batches.append(yb)
    return batches


def test_iterate_batches_covers_each_index_once() -> None:
    batches = _epoch(0)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(batches).tolist()) == list(range(23))
    assert torch.cat(batches).tolist() != list(range(23))


def test_iterate_batches_deterministic_and_new_order_per_epoch() -> None:
    assert all(torch.equal(a, b) for a, b in zip(_epoch(7), _epoch(7), strict=True))
    x, y = _toy()
    gen = torch.Generator().manual_seed(7)
    first = torch.cat([yb for _, yb in iterate_batches(x, y, 5, gen)])
    second = torch.cat([yb for _, yb in iterate_batches(x, y, 5, gen)])
    assert not torch.equal(first, second)


def test_iterate_batches_drop_last_and_no_shuffle() -> None:
    assert [len(b) for b in _epoch(0, drop_last=True)] == [5, 5, 5, 5]
    x, y = _toy()
    ordered = torch.cat([yb for _, yb in iterate_batches(x, y, 5, None, shuffle=False)])
    assert ordered.tolist() == list(range(23))
    with pytest.raises(ValueError):
        next(iterate_batches(x, y, 5, None))
    with pytest.raises(ValueError):
        next(iterate_batches(x, y, 0, torch.Generator()))


def test_subsets() -> None:
    x, y = _toy()
    xs, ys = subset(x, y, 4)
    assert ys.tolist() == [0, 1, 2, 3] and xs.shape == (4, 3)
    xa, ya = random_subset(x, y, 6, seed=3)
    xb, yb = random_subset(x, y, 6, seed=3)
    assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert len(set(ya.tolist())) == 6
    assert torch.equal(xa[:, 0].long(), ya)
    with pytest.raises(ValueError):
        random_subset(x, y, 24, seed=0)


def test_a_random_subset_of_an_image_set_can_keep_its_pixel_codes() -> None:
    """``keep_codes=True`` draws the same rows as an ImageSet of their codes, whose normalised
    rows are the default's bit for bit (a training set then costs a quarter of the memory)."""
    from monquant.data import ImageSet

    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (40, 7), generator=g, dtype=torch.uint8))
    y = torch.arange(40)
    rows, y_rows = random_subset(images, y, 9, seed=5)
    kept, y_kept = random_subset(images, y, 9, seed=5, keep_codes=True)
    assert isinstance(kept, ImageSet) and kept.codes.dtype == torch.uint8 and len(kept) == 9
    assert torch.equal(kept.tensor(), rows) and torch.equal(y_kept, y_rows)
    plain = torch.randn(40, 7, generator=g)
    a, _ = random_subset(plain, y, 9, seed=5, keep_codes=True)  # a tensor stays a tensor
    assert torch.equal(a, plain[y_rows])


def test_image_set_normalises_on_access_exactly() -> None:
    from monquant.data import ImageSet

    codes = torch.randint(
        0, 256, (50, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    images = ImageSet(codes)
    full = codes.float().div(255.0).sub(MEAN).div(STD)
    idx = torch.tensor([3, 1, 49])
    assert torch.equal(images[idx], full[idx]) and torch.equal(images[10:20], full[10:20])
    assert images.shape == (50, 784) and len(images) == 50 and images.dtype == torch.float32
    with pytest.raises(ValueError):
        ImageSet(codes.float())


def test_take_rows_gives_what_indexing_gives() -> None:
    from monquant.data import ImageSet, take_rows

    codes = torch.randint(0, 256, (40, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([5, 0, 39, 5])
    images = ImageSet(codes)
    assert torch.equal(take_rows(images, idx), images[idx]) and torch.equal(images.rows(idx), images[idx])
    for t in (codes, codes.double(), torch.arange(40)):  # images as a plain tensor, labels
        assert torch.equal(take_rows(t, idx), t[idx])


def test_subset_is_the_one_first_k_rule() -> None:
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    assert data.subset(x, y, None)[0] is x
    assert data.subset(x, y, 3)[1].tolist() == [0, 1, 2]
    assert data.subset(x, y, 99)[1].tolist() == [0, 1, 2, 3, 4]
