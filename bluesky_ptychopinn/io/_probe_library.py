"""A directory of named probes with metadata: what the probe-centric workflow trains on.

Each probe ``<name>`` is two files in the library directory:

- ``<name>.npz``: ``probe`` complex64 (M, N, N), normalised to sum |P|^2 = 1 (the photon scale
  is kept apart, docs/conventions.md), and ``pixel_size_m`` (the object pixel size it is
  sampled at);
- ``<name>.json``: name, instrument, energy_ev, pixel_size_m, shape, modes, source file, sha256
  of the probe array bytes (complex64, C order), created date (UTC, ISO 8601).

:meth:`ProbeLibrary.get` recomputes the sha256 and refuses a probe whose bytes changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..geometry import object_pixel_size_m
from ._checks import _load, has, open_hdf5, replacing, scalar
from ._cxi import read_cxi_probe
from ._npz import open_npz
from ._product import read_product

__all__ = ["ProbeLibrary", "default_probe_library_root", "probe_array_sha256", "read_probe",
           "load_probe_reference"]

#: Environment variable naming the default library directory.
ENV_VAR = "PTYCHOPINN_PROBE_LIBRARY"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_probe_library_root() -> Path:
    """``$PTYCHOPINN_PROBE_LIBRARY``, else ``~/.local/share/bluesky-ptychopinn/probes``.

    Returns
    -------
    pathlib.Path
        The directory (not created).

    Examples
    --------
    >>> default_probe_library_root().name  # doctest: +SKIP
    'probes'
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "probes"


def probe_array_sha256(probe: np.ndarray) -> str:
    """sha256 (hex) of the probe's bytes as complex64 in C order.

    Parameters
    ----------
    probe : array_like
        The probe.

    Returns
    -------
    str
        64 hexadecimal digits.

    Examples
    --------
    >>> probe_array_sha256(np.ones((1, 2, 2), np.complex64))[:12]
    'a5b83a75c0c8'
    """
    return hashlib.sha256(np.ascontiguousarray(probe, dtype=np.complex64).tobytes()).hexdigest()


def _checked_probe(probe: Any, problem) -> np.ndarray:
    """(M, N, N) complex64 from numbers of rank 2 or 3, finite and not all zero."""
    array = np.asarray(probe)
    if array.dtype.kind not in "uifc":
        problem(f"expected complex numbers, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2] or 0 in array.shape:
        problem(f"expected (N, N) or (M, N, N), got shape {np.shape(probe)}")
    if not np.isfinite(array).all():
        problem("non-finite values (NaN/inf)")
    if not np.any(array):
        problem("all zero")
    return array.astype(np.complex64)


def _from_npz(path: Path) -> tuple[Any, dict, str]:
    with open_npz(path) as data:
        key = next((k for k in ("probe", "probeGuess") if has(data, k)), None)
        if key is None:
            raise FileFormatError(path, "probe", "missing (looked for 'probe' and 'probeGuess')")
        probe = _load(data, key, path)  # an object array or an absurd size: a clear error
        pixel = next((scalar(data, k, path) for k in ("pixel_size_m", "object_pixel_size_m")
                      if has(data, k)), None)
        geometry = [scalar(data, k, path, required=False)
                    for k in ("energy_ev", "detector_distance_m", "detector_pixel_size_m")]
    if pixel is None and None not in geometry and np.ndim(probe) in (2, 3):
        pixel = object_pixel_size_m(*geometry, np.shape(probe)[-1])
    return probe, {"source": str(path), "energy_ev": geometry[0], "pixel_size_m": pixel}, key


def _from_hdf5(path: Path) -> tuple[Any, dict, str]:
    with open_hdf5(path) as f:  # a truncated file is a FileFormatError, not an OSError
        is_cxi = "entry_1" in f
    if is_cxi:
        probe, info = read_cxi_probe(path)
        return probe, info, info.pop("field")
    rec = read_product(path)
    dy, dx = rec.probe_pixel_size_m
    pixel = dx if abs(dy - dx) <= 1e-9 * dx else None
    return rec.probe, {"source": str(path), "energy_ev": rec.energy_ev, "pixel_size_m": pixel}, \
        "probe"


def read_probe(source: Any) -> tuple[np.ndarray, dict]:
    """A probe from an array or a file, with what the file says about it.

    Parameters
    ----------
    source : array_like or str or pathlib.Path
        An (N, N) or (M, N, N) array; a ``.npy`` array; an NPZ (a library file, or a PtychoPINN
        / our dataset: ``probeGuess``); a CXI file (``/entry_1/image_1/data``); or a ptychodus
        product (``probe``, first OPR mode).

    Returns
    -------
    probe : numpy.ndarray
        complex64 (M, N, N), values as stored (not normalised).
    info : dict
        ``source`` and, when the file says, ``energy_ev`` and ``pixel_size_m`` (else None).

    Raises
    ------
    FileFormatError
        The file is missing, of an unknown kind, or holds no usable probe.
    InvalidInputError
        The array is not a finite, non-zero (M, N, N) probe.

    Examples
    --------
    >>> probe, info = read_probe(np.ones((8, 8)))
    >>> probe.shape, probe.dtype, info["source"]
    ((1, 8, 8), dtype('complex64'), 'array')
    """
    if not isinstance(source, (str, Path)):
        def problem(text: str):
            raise InvalidInputError(f"probe: {text}")

        return _checked_probe(source, problem), {"source": "array", "energy_ev": None,
                                                 "pixel_size_m": None}
    path = Path(source)
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    if h5py.is_hdf5(path):
        probe, info, key = _from_hdf5(path)
    elif path.suffix.lower() == ".npy":
        try:
            probe, key = np.load(path, allow_pickle=False), ""
        except (OSError, ValueError) as exc:
            raise FileFormatError(path, "", f"not a readable .npy array ({exc})") from exc
        info = {"source": str(path), "energy_ev": None, "pixel_size_m": None}
    elif path.suffix.lower() == ".npz":
        probe, info, key = _from_npz(path)
    else:
        raise FileFormatError(path, "", "unknown kind of file: expected .npy, .npz, CXI or a "
                              "ptychodus product (HDF5)")

    def file_problem(text: str):
        raise FileFormatError(path, key, text)

    return _checked_probe(probe, file_problem), info


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _replace_atomically(target: Path, write) -> None:
    """Write through ``write(handle)`` to a temporary file, then rename it onto ``target``."""
    with replacing(target) as partial, open(partial, "wb") as handle:
        write(handle)


class ProbeLibrary:
    """Named probes in a directory: ``<name>.npz`` (probe + pixel size) and ``<name>.json``.

    Parameters
    ----------
    root : str or pathlib.Path, optional
        The directory; default :func:`default_probe_library_root`. Created on the first
        :meth:`add`.

    Examples
    --------
    >>> library = ProbeLibrary(tmp_path)  # doctest: +SKIP
    >>> library.add("hxn-zp", "scan_042.cxi", instrument="NSLS-II HXN")  # doctest: +SKIP
    >>> probe, meta = library.get("hxn-zp")  # doctest: +SKIP
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_probe_library_root()

    def __repr__(self) -> str:
        return f"ProbeLibrary({str(self.root)!r})"

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidInputError(f"probe name {name!r}: expected letters, digits, '.', '-' or "
                                    "'_' (starting with a letter or digit, at most 128)")
        return self.root / f"{name}.npz", self.root / f"{name}.json"

    def __contains__(self, name: object) -> bool:
        try:
            data_path, meta_path = self._paths(name)  # type: ignore[arg-type]
        except InvalidInputError:
            return False
        return data_path.is_file() and meta_path.is_file()

    def names(self) -> list[str]:
        """Names of the probes, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if p.stem in self)

    def add(
        self,
        name: str,
        probe: Any,
        *,
        instrument: str = "",
        energy_ev: float | None = None,
        pixel_size_m: float | None = None,
        overwrite: bool = False,
        source: str | None = None,
        provenance: dict | None = None,
    ) -> dict:
        """Store a probe under ``name``, normalised to sum |P|^2 = 1.

        Parameters
        ----------
        name : str
            Library name (letters, digits, ``.``, ``-``, ``_``).
        probe : array_like or str or pathlib.Path
            An array or a file (see :func:`read_probe`).
        instrument : str
            Instrument / beamline.
        energy_ev : float, optional
            Photon energy; default what the file says, else recorded as unknown (nothing
            reads it back but people: the probe's sampling is its pixel size).
        pixel_size_m : float, optional
            Object pixel size the probe is sampled at; default what the file says. Required one
            way or the other.
        overwrite : bool
            Replace an existing probe of that name.
        source : str, optional
            Where the probe came from, in words (default: the file, or "array").
        provenance : dict, optional
            JSON-serialisable record of how the probe was made (e.g. a calibration's run uid,
            engine and final error, or a resampling), stored under ``provenance``.

        Returns
        -------
        dict
            The metadata written to ``<name>.json``.
        """
        data_path, meta_path = self._paths(name)
        self._check_root()
        if (data_path.exists() or meta_path.exists()) and not overwrite:
            raise InvalidInputError(f"probe {name!r} already exists in {self.root}; replace it "
                                    "with overwrite=True (--overwrite)")
        array, info = read_probe(probe)
        energy_ev = energy_ev if energy_ev is not None else info.get("energy_ev")
        pixel_size_m = pixel_size_m if pixel_size_m is not None else info.get("pixel_size_m")
        if pixel_size_m is None:
            raise InvalidInputError(f"probe {name!r}: pixel size unknown (not in "
                                    f"{info['source']}); give it (pixel_size_m=, or --pixel-m "
                                    "on the command line)")
        for label, value in (("energy_ev", energy_ev), ("pixel_size_m", pixel_size_m)):
            if value is None:
                continue
            try:
                good = bool(np.isfinite(float(value)) and float(value) > 0)
            except (TypeError, ValueError):
                good = False
            if not good:
                raise InvalidInputError(f"{label}: expected a positive number, got {value!r}")
        power = float(np.sum(np.abs(array.astype(np.complex128)) ** 2))
        array = (array / np.sqrt(power)).astype(np.complex64)
        meta = {
            "name": name, "instrument": instrument,
            "energy_ev": None if energy_ev is None else float(energy_ev),
            "pixel_size_m": float(pixel_size_m), "shape": list(array.shape),
            "modes": int(array.shape[0]), "source": source or info["source"],
            "sha256": probe_array_sha256(array), "created": _utc_now(),
            "normalization": "sum |P|^2 = 1", "input_power": power,
        }
        if provenance:
            meta["provenance"] = json.loads(json.dumps(provenance))  # refuse what JSON cannot
        self.root.mkdir(parents=True, exist_ok=True)
        _replace_atomically(data_path, lambda h: np.savez(
            h, probe=array, pixel_size_m=np.float64(pixel_size_m)))
        _replace_atomically(meta_path, lambda h: h.write(json.dumps(meta, indent=2).encode()))
        return meta

    def _check_root(self) -> None:
        """Refuse a library directory that is a file, or lies below one, before any work
        (``mkdir`` would fail only after the probe is read, with a bare ``FileExistsError``)."""
        blocking = next((p for p in (self.root, *self.root.parents)
                         if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            where = ("is a file" if blocking == self.root
                     else f"is inside {blocking}, which is a file")
            raise InvalidInputError(f"probe library {self.root} {where}, not a directory; "
                                    "choose another library directory (--root)")

    def _meta(self, meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FileFormatError(meta_path, "", f"unreadable probe metadata ({exc})") from exc
        if not isinstance(meta, dict) or "sha256" not in meta:
            raise FileFormatError(meta_path, "sha256", "missing (expected the probe's metadata)")
        return meta

    def list(self) -> list[dict]:
        """Metadata of every probe, sorted by name."""
        return [self._meta(self.root / f"{name}.json") for name in self.names()]

    def get(self, name: str) -> tuple[np.ndarray, dict]:
        """The probe and its metadata, after checking its sha256.

        Returns
        -------
        probe : numpy.ndarray
            complex64 (M, N, N), sum |P|^2 = 1.
        meta : dict
            The ``<name>.json`` content.

        Raises
        ------
        InvalidInputError
            No probe of that name.
        FileFormatError
            The probe file is unreadable or its sha256 differs from the metadata.
        """
        data_path, meta_path = self._paths(name)
        if name not in self:
            known = ", ".join(self.names()) or "none"
            raise InvalidInputError(f"probe {name!r} not in {self.root} (known: {known})")
        meta = self._meta(meta_path)
        with open_npz(data_path) as data:
            if not has(data, "probe"):
                raise FileFormatError(data_path, "probe", "missing")
            probe = data["probe"]
        digest = probe_array_sha256(probe)
        if probe.dtype != np.complex64 or digest != meta["sha256"]:
            raise FileFormatError(data_path, "probe", f"sha256 mismatch: metadata says "
                                  f"{meta['sha256'][:16]}..., the file holds {digest[:16]}... "
                                  f"({probe.dtype}); the file was modified or corrupted")
        return probe, meta

    def show(self, name: str) -> dict:
        """The metadata of ``name`` (the probe's sha256 verified)."""
        return self.get(name)[1]

    def remove(self, name: str) -> None:
        """Delete ``name`` from the library."""
        data_path, meta_path = self._paths(name)
        if not (data_path.exists() or meta_path.exists()):
            known = ", ".join(self.names()) or "none"
            raise InvalidInputError(f"probe {name!r} not in {self.root} (known: {known})")
        meta_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)


def load_probe_reference(reference: str, library: ProbeLibrary | None = None, *,
                         flag: str = "--probe") -> tuple[np.ndarray, float | None, str]:
    """A probe named on the command line: a library name first, else a probe file.

    Returns
    -------
    probe : numpy.ndarray
        (M, N, N) complex probe as stored.
    pixel_size_m : float or None
        Its object pixel size when the library or the file says.
    source : str
        Where it came from, in words.

    Raises
    ------
    InvalidInputError
        Neither a library probe nor a file (naming ``flag`` and the known names).
    """
    library = library or ProbeLibrary()
    if reference in library:
        probe, meta = library.get(reference)
        return probe, meta.get("pixel_size_m"), f"probe library: {reference}"
    if Path(reference).is_file():
        probe, info = read_probe(reference)
        return probe, info.get("pixel_size_m"), f"file: {reference}"
    known = ", ".join(library.names()) or "none"
    raise InvalidInputError(f"{flag} {reference}: neither a probe in {library.root} (known: "
                            f"{known}) nor a probe file")
