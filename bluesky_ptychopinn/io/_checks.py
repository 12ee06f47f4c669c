"""Reading fields from NPZ archives and HDF5 files with errors that name file, field and problem.

Also the JSON encoding of dataset metadata, shared by the writers.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FileFormatError

#: dtype kinds of real numbers (unsigned, signed, float) and of complex numbers.
REAL = "uif"
COMPLEX = "c"
_KIND_NAMES = {"u": "unsigned int", "i": "int", "f": "float", "c": "complex", "b": "bool"}


def _describe_kinds(kinds: str) -> str:
    return " or ".join(_KIND_NAMES.get(k, k) for k in kinds)


#: HDF5's message for a file shorter than its superblock says (an interrupted copy or write).
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def _open_problem(exc: OSError) -> str:
    """What is wrong with a file HDF5 refused to open, in words (no HDF5 stack dump)."""
    truncated = _TRUNCATED.search(str(exc))
    if truncated:
        have, want = (int(g) for g in truncated.groups())
        return (f"truncated HDF5 file: {have} of {want} bytes present (an interrupted copy "
                "or write?)")
    return f"not a readable HDF5 file ({exc})"


def open_hdf5(path: Path) -> h5py.File:
    """Open read-only; a missing, truncated or non-HDF5 file is a :class:`FileFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(path, "", _open_problem(exc)) from exc


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 0


def _check_declared(shape: tuple, dtype: np.dtype, key: str, path: Path) -> None:
    """Refuse, before reading, an array that declares more bytes than the machine has: a
    27 kB file may declare a 195 GiB array (compressed, or never written)."""
    declared = int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize)
    limit = memory_bytes()
    if limit and declared > 0.8 * limit:
        raise FileFormatError(path, key, f"declares {tuple(shape)} of {np.dtype(dtype)} = "
                              f"{declared / 2**30:.1f} GiB, more than this machine can hold "
                              f"({limit / 2**30:.1f} GiB of memory); read a subset of the "
                              "frames, or use a machine with more memory")


def _check_size(item: Any, key: str, path: Path) -> None:
    """:func:`_check_declared` for an HDF5 dataset (anything with a shape and a dtype)."""
    shape = getattr(item, "shape", None)
    dtype = getattr(item, "dtype", None)
    if shape is None or dtype is None:
        return
    _check_declared(shape, dtype, key, path)


def _npz_member(data: np.lib.npyio.NpzFile, key: str) -> str | None:
    """The archive member ``data[key]`` reads (``key`` itself, else ``key.npy``), or None."""
    names = data.zip.namelist()
    return next((name for name in (key, f"{key}.npy") if name in names), None)


def npz_header(data: np.lib.npyio.NpzFile, key: str, path: Path) -> tuple[tuple, np.dtype]:
    """Shape and dtype of an NPZ member from its ``.npy`` header, without reading the array.

    ``np.load`` only opens the archive; ``data[key]`` then inflates the whole member, so the
    header is the one place to see how big an array is before memory is spent on it.
    """
    member = _npz_member(data, key)
    if member is None:
        raise KeyError(key)
    try:
        with data.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            # 2.0 and 3.0 headers differ only in their length field's width and encoding
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = read(handle)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise FileFormatError(path, key, f"not a readable .npy array ({exc})") from exc
    return shape, dtype


def _load_npz(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """An NPZ member, its declared size checked first (as HDF5 datasets' are)."""
    shape, dtype = npz_header(data, key, path)
    if dtype.hasobject:
        raise FileFormatError(path, key, f"holds Python objects (dtype {dtype}), not a numeric "
                              "array")
    _check_declared(shape, dtype, key, path)
    try:
        return _native(data[key])
    except MemoryError as exc:
        raise FileFormatError(path, key, f"does not fit in memory ({exc})") from exc
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        # a truncated or corrupt member (the header was readable)
        raise FileFormatError(path, key, f"cannot be read ({exc})") from exc


def _native(value: np.ndarray) -> np.ndarray:
    """``value`` in the machine's byte order (torch refuses big-endian arrays)."""
    if value.dtype.byteorder not in ("=", "|") and not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def _load(container: Any, key: str, path: Path) -> np.ndarray:
    """The value stored under ``key`` as a numpy array (NPZ member or HDF5 dataset), in
    native byte order; a missing ``key`` is a ``KeyError``."""
    if isinstance(container, np.lib.npyio.NpzFile):
        return _load_npz(container, key, path)
    item = container[key]
    if isinstance(item, np.ndarray):
        return _native(item)
    if not hasattr(item, "shape"):  # an HDF5 group where a dataset is expected
        raise FileFormatError(path, key, f"expected a dataset, found {type(item).__name__}")
    _check_size(item, key, path)
    try:
        return _native(np.asarray(item[()]))
    except MemoryError as exc:
        raise FileFormatError(path, key, f"does not fit in memory ({exc})") from exc
    except (OSError, TypeError, ValueError) as exc:  # unreadable / corrupt chunk
        raise FileFormatError(path, key, f"cannot be read ({exc})") from exc


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block
    succeeds, removed when it fails.

    A failed write (full disk, quota, an error half-way) then leaves the previous file as it
    was and no truncated one: the rename is atomic within a directory.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """Smallest and largest finite value of an array, without copying it (``(inf, -inf)``
    when there is none)."""
    if values.size == 0:
        return np.inf, -np.inf
    if values.dtype.kind != "f":
        return float(values.min()), float(values.max())
    finite = np.isfinite(values)  # one byte per value, a quarter of float32 data
    return (float(values.min(where=finite, initial=np.inf)),
            float(values.max(where=finite, initial=-np.inf)))


def has(container: Any, key: str) -> bool:
    """``key in container`` that also accepts HDF5 paths with leading slashes."""
    try:
        return key in container
    except (KeyError, ValueError):
        return False


def require(
    container: Any,
    key: str,
    path: Path,
    *,
    ndim: int | tuple[int, ...] | None = None,
    kinds: str | None = None,
    what: str = "",
) -> np.ndarray:
    """``container[key]`` as an array, checked for presence, rank and dtype kind.

    Parameters
    ----------
    container : numpy.lib.npyio.NpzFile or h5py.File
        Where to look.
    key : str
        Member name or HDF5 path.
    path : pathlib.Path
        The file, for the error message.
    ndim : int or tuple of int, optional
        Accepted ranks.
    kinds : str, optional
        Accepted dtype kinds, e.g. ``"uif"``.
    what : str
        What the field holds, appended to the "missing" message.
    """
    if not has(container, key):
        raise FileFormatError(path, key, "missing (required" + (f": {what})" if what else ")"))
    return check(_load(container, key, path), key, path, ndim=ndim, kinds=kinds)


def optional(
    container: Any,
    key: str,
    path: Path,
    *,
    ndim: int | tuple[int, ...] | None = None,
    kinds: str | None = None,
) -> np.ndarray | None:
    """Like :func:`require`, but None when the field is absent."""
    if not has(container, key):
        return None
    return check(_load(container, key, path), key, path, ndim=ndim, kinds=kinds)


def check(
    value: np.ndarray,
    key: str,
    path: Path,
    *,
    ndim: int | tuple[int, ...] | None = None,
    kinds: str | None = None,
) -> np.ndarray:
    """Raise :class:`FileFormatError` unless ``value`` has an accepted rank and dtype kind."""
    if kinds is not None and value.dtype.kind not in kinds:
        raise FileFormatError(path, key, f"expected dtype {_describe_kinds(kinds)}, "
                              f"got {value.dtype}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if value.ndim not in ranks:
            expected = " or ".join(str(r) for r in ranks)
            raise FileFormatError(path, key, f"expected {expected} dimensions, got shape "
                                  f"{value.shape}")
    return value


def nonempty(value: np.ndarray, key: str, path: Path, what: str) -> np.ndarray:
    """``value`` unless an axis has length 0 (a declared but empty dataset): taking its first
    mode or layer would be an ``IndexError``."""
    if 0 in value.shape:
        raise FileFormatError(path, key, f"empty: shape {value.shape} holds no {what}")
    return value


def scalar(container: Any, key: str, path: Path, *, required: bool = True) -> float | None:
    """A positive finite number stored as a 0-d or 1-element dataset (None if optional)."""
    if not has(container, key):
        if required:
            raise FileFormatError(path, key, "missing (required: a positive number)")
        return None
    value = check(_load(container, key, path), key, path, kinds=REAL)
    if value.size != 1:
        raise FileFormatError(path, key, f"expected a single number, got shape {value.shape}")
    number = float(value.reshape(()))
    if not (np.isfinite(number) and number > 0):
        raise FileFormatError(path, key, f"expected a positive finite number, got {number!r}")
    return number


def text(value: Any) -> str:
    """An HDF5 string (bytes, numpy string or 0-d array) as ``str``."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)  # last resort: keep a readable trace rather than fail the write


def metadata_to_json(metadata: Mapping) -> str:
    """Dataset metadata as a JSON string (numpy values converted, other objects as text)."""
    return json.dumps(dict(metadata), default=_jsonable, sort_keys=True)


def metadata_from_json(raw: Any, path: Path, key: str) -> dict:
    """Parse metadata written by :func:`metadata_to_json`; a bad value names the field."""
    try:
        loaded = json.loads(text(raw))
    except json.JSONDecodeError as exc:
        raise FileFormatError(path, key, f"expected a JSON object, cannot parse ({exc})") from exc
    if not isinstance(loaded, dict):
        raise FileFormatError(path, key, f"expected a JSON object, got {type(loaded).__name__}")
    return loaded


#: Metadata key of a reader that converted positions from metres to object pixels:
#: ``{"pixel_size_m": dx, "anchor_px": [y, x]}``, the pixel size used and the point (pixels)
#: that stays put when that pixel size changes (the origin (0, 0) when the file or the caller
#: fixed it in metres, the lowest position when the reader chose the origin from the scan).
#: A corrected pixel size (``reconstruct --energy-ev``) rescales such positions about it.
POSITIONS_FROM_M = "positions_from_m"


def merge_metadata(stored: dict, path: Path, fmt: str, conversions: list[str]) -> dict:
    """Metadata of a dataset just read: what the file stored plus this read's provenance.

    The writer's own ``source``/``format``/``conversions``/:data:`POSITIONS_FROM_M` (if any)
    move to ``written_from`` so that this read's conversions are never confused with those of
    an earlier read (positions an earlier read converted from metres are pixels in this file).
    """
    earlier = {k: stored.pop(k) for k in ("source", "format", "conversions", POSITIONS_FROM_M)
               if k in stored}
    merged = dict(stored)
    if earlier:
        merged["written_from"] = earlier
    merged.update(source=str(path), format=fmt, conversions=conversions)
    return merged
