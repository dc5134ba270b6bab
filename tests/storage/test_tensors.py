"""Tests of safe tensor files: roundtrips, atomic writes, corruption, tampering, refused formats."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from monquant.errors import CheckpointError, MonquantError
from monquant.storage.files import atomic_write_bytes
from monquant.storage.tensors import (
    load_tensors,
    load_weight_file,
    payload_digest,
    save_tensors,
)

META = {"model": "mondeq", "bits": 4, "nested": {"alpha": 0.5, "layers": [1, 2, 3]}, "ok": True}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.float32": torch.randn(4, 3, generator=g),
        "w.float64": torch.randn(5, generator=g, dtype=torch.float64),
        "q.int8": torch.randint(-128, 128, (3, 3), generator=g, dtype=torch.int8),
        "q.int32": torch.randint(-(2**31), 2**31 - 1, (7,), generator=g, dtype=torch.int32),
        "scalar": torch.tensor(1.5),
        "mask": torch.tensor([True, False, True]),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # non-contiguous
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_tensors(tmp_path / "ckpt.safetensors", _tensors(), META)


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _flip(path: Path, index: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[index] ^= mask
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------------------------
# Roundtrips
# ----------------------------------------------------------------------------------------------


def test_roundtrip(saved: Path) -> None:
    tensors, meta = load_tensors(saved)
    assert meta == META
    expected = _tensors()
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype
        assert torch.equal(tensors[name], t), name
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp files left


def test_save_moves_to_cpu_and_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.safetensors"
    save_tensors(path, {"x": torch.ones(2)}, {"v": 1})
    save_tensors(path, {"x": torch.zeros(3)}, {"v": 2})
    tensors, meta = load_tensors(path)
    assert meta == {"v": 2} and torch.equal(tensors["x"], torch.zeros(3))
    assert len(list(path.parent.iterdir())) == 1


def test_empty_metadata_and_digest_is_order_independent(tmp_path: Path) -> None:
    t = _tensors()
    assert payload_digest(t) == payload_digest(dict(reversed(list(t.items()))))
    assert payload_digest(t, "{}") != payload_digest(t, '{"a": 1}')
    _, meta = load_tensors(save_tensors(tmp_path / "e.safetensors", t))
    assert meta == {}


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_tensors(tmp_path / "m.safetensors", {"x": torch.ones(1)}, {"bad": object()})
    with pytest.raises(ValueError):
        save_tensors(tmp_path / "m.safetensors", {"x": torch.ones(1)}, {"nan": float("nan")})
    assert not (tmp_path / "m.safetensors").exists()


def test_atomic_write_bytes(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "d" / "blob.bin", b"abc")
    atomic_write_bytes(path, b"defg")
    assert path.read_bytes() == b"defg"
    assert os.listdir(path.parent) == ["blob.bin"]
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    atomic_write_bytes(path, b"h")
    assert path.stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------------------------------------
# Corrupt and tampered files
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_tensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_truncated_file(saved: Path, keep: int) -> None:
    raw = saved.read_bytes()
    saved.write_bytes(raw[:keep] if keep >= 0 else raw[:-9])
    with pytest.raises(CheckpointError, match="truncated"):
        load_tensors(saved)


def test_trailing_bytes(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"extra")
    with pytest.raises(CheckpointError, match="5 unexpected bytes"):
        load_tensors(saved)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is definitely not a tensor file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_tensors(path)


def test_flipped_payload_byte_is_tampering(saved: Path) -> None:
    _flip(saved, 8 + _header_len(saved) + 3)
    with pytest.raises(CheckpointError, match="tampered"):
        load_tensors(saved)
    tensors, _ = load_tensors(saved, verify=False)  # an explicit opt-out still loads
    assert set(tensors) == set(_tensors())


def test_every_payload_byte_is_covered(saved: Path) -> None:
    clean = saved.read_bytes()
    start = 8 + _header_len(saved)
    for index in range(start, len(clean), 7):
        saved.write_bytes(clean)
        _flip(saved, index, 0x80)
        with pytest.raises(CheckpointError, match="tampered"):
            load_tensors(saved, allow_nonfinite=True)


def test_flipped_header_brace_is_clear_error(saved: Path) -> None:
    _flip(saved, 8)  # '{' -> 'z'
    with pytest.raises(CheckpointError, match="header"):
        load_tensors(saved)


def test_every_header_byte_flip_is_a_clear_error(saved: Path) -> None:
    clean = saved.read_bytes()
    for index in range(8 + _header_len(saved)):
        saved.write_bytes(clean)
        _flip(saved, index)
        try:
            load_tensors(saved, allow_nonfinite=True)
        except CheckpointError:
            continue
        raw = clean[8 : 8 + _header_len(saved)]
        pytest.fail(f"flip at byte {index} went unnoticed (near {raw[max(0, index - 20) :]!r})")


def test_bad_json_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    meta = {"monquant": "{not json", "format_version": "1", "payload_sha256": "0" * 64}
    save_file({"x": torch.ones(2)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="bad JSON metadata"):
        load_tensors(path)


def test_plain_safetensors_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="load_weight_file"):
        load_tensors(path)


def test_future_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    meta = {"monquant": "{}", "format_version": "99", "payload_sha256": "0" * 64}
    save_file({"x": torch.ones(2)}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="format_version"):
        load_tensors(path)


def test_nonfinite_refused_by_default(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match=r"non-finite.*w"):
        load_tensors(path)
    tensors, _ = load_tensors(path, allow_nonfinite=True)
    assert torch.isnan(tensors["w"][1])
    with pytest.raises(CheckpointError, match="non-finite"):
        load_weight_file(path)


def test_errors_share_base_class(tmp_path: Path) -> None:
    with pytest.raises(MonquantError):
        load_tensors(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# User weight files
# ----------------------------------------------------------------------------------------------


def test_weight_file_safetensors_plain_and_ours(tmp_path: Path, saved: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(4.0)}, str(plain))
    assert torch.equal(load_weight_file(plain)["w"], torch.arange(4.0))
    assert torch.equal(load_weight_file(saved)["q.int8"], _tensors()["q.int8"])
    _flip(saved, 8 + _header_len(saved))
    with pytest.raises(CheckpointError, match="tampered"):
        load_weight_file(saved)


def test_npz_roundtrip(tmp_path: Path) -> None:
    arrays = {
        "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "q": np.array([-3, 7], dtype=np.int8),
    }
    np.savez(tmp_path / "w.npz", **arrays)
    loaded = load_weight_file(tmp_path / "w.npz")
    assert set(loaded) == set(arrays)
    for name, arr in arrays.items():
        assert loaded[name].dtype == torch.from_numpy(arr).dtype
        assert np.array_equal(loaded[name].numpy(), arr)


def test_npz_object_array_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", w=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        load_weight_file(tmp_path / "obj.npz")


def test_npz_truncated_or_not_zip(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, w=np.ones(1000))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weight_file(path)
    path.write_bytes(b"\x80\x04garbage that numpy would try to unpickle")
    with pytest.raises(CheckpointError, match="unpickling"):
        load_weight_file(path)


def test_npz_corrupt_member(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=np.arange(2000.0))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside the deflate stream (CRC or inflate fails)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_weight_file(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".ckpt", ".PT"])
def test_pickle_formats_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"irrelevant: never opened")
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_weight_file(path)
    assert "safetensors" in str(info.value) and "savez" in str(info.value)


def test_unknown_suffix_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported"):
        load_weight_file(path)


def test_saved_header_layout(saved: Path) -> None:
    header = json.loads(saved.read_bytes()[8 : 8 + _header_len(saved)])
    meta = header["__metadata__"]
    assert json.loads(meta["monquant"]) == META
    assert meta["format_version"] == "1" and len(meta["payload_sha256"]) == 64
