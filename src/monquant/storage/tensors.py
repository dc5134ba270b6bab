"""Safe tensors on disk: safetensors files with verified metadata, and pickle-free weight import.

Format of files written by :func:`save_tensors`
-----------------------------------------------
A standard safetensors file whose header metadata (a string-to-string map) holds:

* ``"monquant"``: the caller's metadata as a JSON string;
* ``"format_version"``: :data:`FORMAT_VERSION` as a string;
* ``"payload_sha256"``: SHA-256 over the metadata JSON and, in sorted-name order, every tensor's
  name, dtype, shape and raw bytes (see :func:`payload_digest`). Any change to a tensor or to the
  metadata after saving is detected on load as tampering. (The digest guards integrity, not
  authenticity: someone who rewrites the file can also rewrite the digest.)

Nothing here ever unpickles data: ``.pt``/``.pth``/``.pkl``/``.ckpt`` files are refused, and
``.npz`` archives are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save_file as _st_save_file

from monquant.errors import CheckpointError, ConfigError, InputTypeError
from monquant.storage.files import PathLike, atomic_target
from monquant.storage.jsonio import from_jsonable

__all__ = [
    "FORMAT_VERSION",
    "is_monquant_file",
    "load_tensors",
    "load_weight_file",
    "payload_digest",
    "save_tensors",
]

FORMAT_VERSION = 1
_META_KEY = "monquant"
_VERSION_KEY = "format_version"
_DIGEST_KEY = "payload_sha256"
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib"}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on header size
_NUMERIC_KINDS = "biufc"  # numpy dtype kinds that map onto torch dtypes



# ----------------------------------------------------------------------------------------------
# Digest
# ----------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes (C order, native little-endian) as a flat uint8 array (no copy)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def payload_digest(tensors: Mapping[str, torch.Tensor], metadata_json: str = "") -> str:
    """Hex SHA-256 over ``metadata_json`` and each tensor's name, dtype, shape and bytes.

    Tensors are taken in sorted-name order; every field is length-prefixed so that no two
    different payloads hash the same byte stream.
    """
    h = hashlib.sha256()

    def put(blob: bytes) -> None:
        h.update(struct.pack("<Q", len(blob)))
        h.update(blob)

    put(f"monquant-v{FORMAT_VERSION}".encode())
    put(metadata_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        put(name.encode("utf-8"))
        put(str(t.dtype).encode())
        put(json.dumps(list(t.shape)).encode())
        h.update(struct.pack("<Q", t.numel() * t.element_size()))
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (copies, so no two saved tensors share storage)."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputTypeError(
                f"expected str -> torch.Tensor, got {type(name).__name__} -> {type(t).__name__}"
            )
        out[name] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return out


def _metadata_json(metadata: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata must be JSON-serialisable (finite numbers): {exc}") from exc


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``tensors`` with JSON ``metadata`` to a safetensors file, atomically.

    Tensors are copied to contiguous CPU memory first. The header records the metadata, the
    format version and the payload digest (see the module docstring). Returns the path.
    """
    path = Path(path)
    prepared = _prepare(tensors)
    meta_json = _metadata_json(metadata)
    header = {
        _META_KEY: meta_json,
        _VERSION_KEY: str(FORMAT_VERSION),
        _DIGEST_KEY: payload_digest(prepared, meta_json),
    }
    try:
        with atomic_target(path) as tmp:
            _st_save_file(prepared, str(tmp), metadata=header)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from exc


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The safetensors JSON header, after checking that the file is long enough for it."""
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER:
        raise CheckpointError(f"{path}: not a safetensors file (header length field {n})")
    if len(raw) < 8 + n:
        raise CheckpointError(
            f"{path}: truncated: header needs {n} bytes, file has {len(raw) - 8} after the prefix"
        )
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: not a safetensors file or header corrupt (header is not valid JSON: {exc})"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _payload_length(path: Path, header: dict[str, Any]) -> int:
    """Bytes of tensor data the header describes (largest end offset)."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise CheckpointError(f"{path}: header corrupt (bad entry for '{name}')") from exc
    return end


def _decode(path: Path, raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file held in ``raw``, with clear errors."""
    header = _parse_header(path, raw)
    n = struct.unpack("<Q", raw[:8])[0]
    need, have = _payload_length(path, header), len(raw) - 8 - n
    if have < need:
        raise CheckpointError(
            f"{path}: truncated (or header corrupt): tensor data needs {need} bytes, has {have}"
        )
    if have > need:
        raise CheckpointError(f"{path}: corrupt: {have - need} unexpected bytes after the data")
    try:
        tensors = _st_load(raw)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from exc
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header corrupt (__metadata__ is not an object)")
    return tensors, meta


def _is_ours(meta: Mapping[str, str]) -> bool:
    return _META_KEY in meta or _DIGEST_KEY in meta


def is_monquant_file(path: PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_tensors` (header only).

    Reads just the header; raises :class:`CheckpointError` for an unreadable or non-safetensors
    file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            raw = prefix + fh.read(min(n, _MAX_HEADER))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from exc
    header = _parse_header(path, raw)
    meta = header.get("__metadata__") or {}
    return isinstance(meta, dict) and _is_ours(meta)


def _check_ours(
    path: Path, tensors: dict[str, torch.Tensor], meta: Mapping[str, str], verify: bool
) -> dict[str, Any]:
    """Validate monquant header fields (and the digest when ``verify``); return user metadata."""
    missing = [k for k in (_META_KEY, _VERSION_KEY, _DIGEST_KEY) if k not in meta]
    if missing:
        raise CheckpointError(
            f"{path}: not a monquant tensor file (header metadata lacks {', '.join(missing)}); "
            "plain safetensors weights can be read with load_weight_file"
        )
    version = meta[_VERSION_KEY]
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: unknown format_version {version!r} (this monquant reads version "
            f"{FORMAT_VERSION}; a newer release may read it)"
        )
    try:
        user = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: bad JSON metadata: {exc}") from exc
    if not isinstance(user, dict):
        raise CheckpointError(f"{path}: bad JSON metadata: expected an object")
    if verify and payload_digest(tensors, meta[_META_KEY]) != meta[_DIGEST_KEY]:
        raise CheckpointError(
            f"{path}: SHA-256 digest mismatch: the file was tampered with or corrupted after "
            "it was saved"
        )
    return from_jsonable(user)


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = [
        name
        for name, t in sorted(tensors.items())
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"{path}: non-finite values (NaN or inf) in tensor(s) {', '.join(bad)}; "
            "pass allow_nonfinite=True to load anyway"
        )


def _to_device(
    tensors: dict[str, torch.Tensor], device: str | torch.device
) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in tensors.items()}


def load_tensors(
    path: PathLike,
    device: str | torch.device = "cpu",
    verify: bool = True,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`: ``(tensors, metadata)``.

    Raises :class:`CheckpointError` for a missing, truncated or non-safetensors file, a file
    without monquant metadata, bad JSON metadata, a digest mismatch (tampering; checked when
    ``verify``) and, unless ``allow_nonfinite``, NaN/inf in floating tensors.
    """
    path = Path(path)
    tensors, meta = _decode(path, _read_file(path))
    user = _check_ours(path, tensors, meta, verify)
    if not allow_nonfinite:
        _check_finite(path, tensors)
    return _to_device(tensors, device), user


# ----------------------------------------------------------------------------------------------
# User-supplied weight files
# ----------------------------------------------------------------------------------------------


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: '{path.suffix}' files are pickle-based and are not loaded, because unpickling "
        "can run arbitrary code. Convert them once, in a trusted environment, e.g.\n"
        "  sd = torch.load(FILE, weights_only=True)\n"
        "  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
        "'weights.safetensors')\n"
        "or  numpy.savez('weights.npz', **{k: v.numpy() for k, v in sd.items()})"
    )


def _npz_array(path: Path, archive: Any, name: str) -> torch.Tensor:
    try:
        arr = archive[name]
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise CheckpointError(f"{path}: array '{name}' is corrupt: {exc}") from exc
        raise CheckpointError(
            f"{path}: array '{name}' holds Python objects (pickled data), which are refused "
            "for safety; save plain numeric arrays"
        ) from exc
    if not isinstance(arr, np.ndarray):  # a zip of other files (e.g. torch.save) named .npz
        raise CheckpointError(
            f"{path}: entry '{name}' is not a numpy array: this is not an .npz written by "
            "numpy.savez (a torch.save file renamed .npz?); see 'monquant certify --help'"
        )
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise CheckpointError(f"{path}: array '{name}' has non-numeric dtype {arr.dtype}")
    try:
        return torch.from_numpy(np.ascontiguousarray(arr).copy())
    except TypeError as exc:
        raise CheckpointError(f"{path}: array '{name}': dtype {arr.dtype} unsupported") from exc


def _load_npz(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as exc:  # numpy falls back to unpickling anything that is not npy/npz
        raise CheckpointError(
            f"{path}: not an .npz archive; numpy could only read it by unpickling, which is "
            "refused for safety"
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"{path}: not a valid .npz archive (truncated or corrupt)") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not an .npz archive (a single .npy array?)")
    with archive:
        try:
            return {name: _npz_array(path, archive, name) for name in archive.files}
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
            raise CheckpointError(f"{path}: .npz archive is truncated or corrupt: {exc}") from exc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    tensors, meta = _decode(path, _read_file(path))
    if _is_ours(meta):
        _check_ours(path, tensors, meta, verify=True)
    return tensors


def load_weight_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a user-supplied weights file (``.safetensors`` or ``.npz``) into CPU tensors.

    A safetensors file written by :func:`save_tensors` has its digest verified. Pickle-based
    formats (``.pt``, ``.pth``, ``.pkl``, ``.ckpt``, ...) are refused with conversion advice.
    Non-finite values are refused. Raises :class:`CheckpointError` for every problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise _refuse_pickle(path)
    if suffix == ".safetensors":
        tensors = _load_safetensors(path)
    elif suffix == ".npz":
        tensors = _load_npz(path)
    else:
        raise CheckpointError(
            f"{path}: unsupported weight file type '{suffix}'; use .safetensors or .npz"
        )
    _check_finite(path, tensors)
    return tensors
