"""The PtychoPINN NPZ contract.

Keys (PtychoPINN): ``diffraction`` (n, N, N) float32 **amplitudes** = sqrt(counts) (legacy
``diff3d``: photon counts), ``probeGuess`` (N, N) complex, ``objectGuess`` (H, W) complex,
``xcoords``, ``ycoords`` (n,) probe centres in object pixels; optional ``scan_index``,
``xcoords_start``, ``ycoords_start``, ``Y``.

Positions: ``ycoords``/``xcoords`` are probe centres in PtychoPINN's object frame; we take them as
our (y, x) unchanged, with the object pixel origin at the centre of pixel (0, 0).

Keys we add (optional, ignored by PtychoPINN): ``energy_ev``, ``detector_distance_m``,
``detector_pixel_size_m``, ``object_pixel_size_m``, ``mask`` (bool, True = valid) and
``metadata_json`` (the dataset's metadata as JSON).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ._checks import (
    COMPLEX,
    REAL,
    _load,
    finite_range,
    has,
    merge_metadata,
    metadata_from_json,
    metadata_to_json,
    optional,
    replacing,
    require,
    scalar,
)
from ._dataset import PtychoDataset

__all__ = ["read_npz", "write_npz", "open_npz"]

_GEOMETRY = ("energy_ev", "detector_distance_m", "detector_pixel_size_m", "object_pixel_size_m")
_IGNORED = ("Y", "xcoords_start", "ycoords_start")
FORMAT = "ptychopinn-npz"


def _looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file read as UTF-8 text (the head may cut a character)."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(char.isprintable() or char in "\r\n\t" for char in text)
    return False


def open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` without pickle; anything but an NPZ archive is a :class:`FileFormatError`."""
    # np.load takes any file that is neither ZIP nor .npy for a pickle, so a text file named
    # .npz would be refused as "pickled (object) data": name what the file is instead.
    try:
        with open(path, "rb") as handle:
            magic = handle.read(512)
    except FileNotFoundError as exc:
        raise FileFormatError(path, "", "no such file") from exc
    except IsADirectoryError as exc:
        raise FileFormatError(path, "", "a directory, not an NPZ file") from exc
    except OSError as exc:
        raise FileFormatError(path, "", f"cannot be read ({exc.strerror or exc})") from exc
    if not magic.startswith((b"PK", b"\x93NUMPY")):
        what = ("nothing (an empty file)" if not magic else
                "text" if _looks_like_text(magic) else "binary data of another kind")
        raise FileFormatError(path, "", f"not a readable NPZ file: it holds {what}, not a ZIP "
                              "archive of .npy arrays")
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise FileFormatError(path, "", "no such file") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(path, "", f"not a readable NPZ file ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise FileFormatError(path, "", f"not an NPZ archive: a single .npy array of shape "
                              f"{np.shape(data)}")
    return data


def _counts(data, path: Path, conversions: list[str]) -> tuple[np.ndarray, str]:
    """Photon counts from ``diffraction`` (amplitudes, squared) or ``diff3d`` (counts)."""
    if has(data, "diffraction"):
        amplitude = require(data, "diffraction", path, ndim=3, kinds=REAL)
        # Reductions, not boolean-index copies: peak memory stays ~2x the data.
        low, high = finite_range(amplitude)
        if low < 0:
            raise FileFormatError(path, "diffraction", "expected amplitudes >= 0 (sqrt of "
                                  f"counts), got negative values (min {low:g})")
        sample = amplitude[: max(1, 4_000_000 // max(1, amplitude[0].size))]  # a few frames
        sample = sample[np.isfinite(sample)]
        if high > 1 and sample.size and np.array_equal(sample, np.round(sample)):
            # sqrt(counts) is almost never an integer: these are very likely counts stored
            # under the amplitude key, and squaring them would square the photon numbers.
            warnings.warn(
                f"{path}: 'diffraction' holds only integer values (max {high:g}): "
                "these look like photon counts, but the PtychoPINN contract stores amplitudes "
                "(sqrt of counts) there; they are squared as the contract says. Store counts "
                "under 'diff3d' (or convert with sqrt) if they are counts.",
                UserWarning, stacklevel=3)
        # The closest float32 to amplitude**2: a float32 square is correctly rounded (the
        # exact square of a float32 fits a float64, so squaring there and rounding is the same);
        # wider input is squared in float64 and rounded once.
        if amplitude.dtype == np.float32:
            counts = np.square(amplitude)
        else:
            counts = np.square(amplitude, dtype=np.float64).astype(np.float32)
        conversions.append("diffraction was amplitude (sqrt of counts) -> squared to photon "
                           "counts (float32)")
        if has(data, "diff3d"):
            conversions.append("diff3d also present: ignored, diffraction used")
        return counts, "diffraction"
    if has(data, "diff3d"):
        counts = require(data, "diff3d", path, ndim=3, kinds=REAL)
        conversions.append("diff3d taken as photon counts (no conversion)")
        return counts, "diff3d"
    if has(data, "frames_omitted"):
        raise FileFormatError(path, "diffraction", "none: this is a reconstruction result written "
                              "without its frames (`reconstruct --include-frames` keeps them); "
                              "its objectGuess and probeGuess load with numpy.load")
    raise FileFormatError(path, "diffraction", "missing (required: 'diffraction' amplitudes or "
                          "legacy 'diff3d' counts)")


def _positions(data, path: Path) -> np.ndarray:
    x = require(data, "xcoords", path, ndim=1, kinds=REAL)
    y = require(data, "ycoords", path, ndim=1, kinds=REAL)
    if len(x) != len(y):
        raise FileFormatError(path, "ycoords", f"inconsistent lengths: {len(y)} values, "
                              f"xcoords has {len(x)}")
    return np.stack([y, x], axis=1).astype(np.float64)


def _mask(data, path: Path) -> np.ndarray | None:
    mask = optional(data, "mask", path, ndim=2, kinds="biu")
    if mask is None or mask.dtype == np.bool_:
        return mask
    if not np.isin(mask, (0, 1)).all():
        raise FileFormatError(path, "mask", "expected bool or 0/1 (1 = valid pixel), got "
                              f"values {np.unique(mask)[:5].tolist()}")
    return mask.astype(bool)


def read_npz(path: str | Path) -> PtychoDataset:
    """Read a PtychoPINN NPZ file into a validated :class:`PtychoDataset`.

    ``diffraction`` holds *amplitudes* in the PtychoPINN contract and is squared to photon
    counts; legacy ``diff3d`` holds counts and is taken as is. The conversion is recorded in
    ``metadata["conversions"]``. ``ycoords``/``xcoords`` become ``positions_px`` (y, x) unchanged.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.npz`` file.

    Returns
    -------
    PtychoDataset
        Counts, positions, probe, and whatever of object, mask, geometry and metadata the file
        holds. ``metadata["scan_index"]`` keeps ``scan_index`` when present.

    Raises
    ------
    FileFormatError
        Not an NPZ archive, or a field missing, of the wrong shape, dtype or values; the message
        names the file and the field.

    Examples
    --------
    >>> ds = read_npz("experiment.npz")  # doctest: +SKIP
    >>> ds.metadata["conversions"][0]  # doctest: +SKIP
    'diffraction was amplitude (sqrt of counts) -> squared to photon counts (float32)'
    """
    path = Path(path)
    with open_npz(path) as data:
        conversions: list[str] = []
        counts, frames_key = _counts(data, path, conversions)
        probe = require(data, "probeGuess", path, ndim=(2, 3), kinds=COMPLEX + REAL)
        positions = _positions(data, path)
        obj = optional(data, "objectGuess", path, ndim=2, kinds=COMPLEX + REAL)
        geometry = {key: scalar(data, key, path, required=False) for key in _GEOMETRY}
        stored = {}
        if has(data, "metadata_json"):
            stored = metadata_from_json(_load(data, "metadata_json", path), path,
                                        "metadata_json")
        scan_index = optional(data, "scan_index", path, ndim=1, kinds="iu")
        if scan_index is not None:
            stored["scan_index"] = scan_index.tolist()
        ignored = [key for key in _IGNORED if has(data, key)]
        if ignored:
            conversions.append(f"not read: {', '.join(ignored)}")
        ds = PtychoDataset(
            diffraction=counts, positions_px=positions, probe=probe, mask=_mask(data, path),
            object=obj, metadata=merge_metadata(stored, path, FORMAT, conversions), **geometry,
        )
    fields = {"diffraction": frames_key, "positions_px": "xcoords, ycoords",
              "probe": "probeGuess", "object": "objectGuess"}
    return ds.validate(path, fields)


def write_npz(
    dataset: PtychoDataset, path: str | Path, *, amplitude: bool = True, compress: bool = True,
    frames: bool = True,
) -> Path:
    """Write ``dataset`` in the PtychoPINN NPZ contract plus our optional keys.

    Parameters
    ----------
    dataset : PtychoDataset
        Validated before writing.
    path : str or pathlib.Path
        Output file (written as given; no suffix is appended); written to a temporary name
        first, so a failure leaves the previous file, and no half file.
    amplitude : bool
        True (the contract): ``diffraction`` = sqrt(counts) as float32. False: ``diff3d`` =
        counts in their own dtype.
    compress : bool
        Deflate the archive (Poisson frames with many zeros shrink several-fold).
    frames : bool
        Store the diffraction frames (default). False writes a result file (object, probe,
        positions, geometry) without them, marked ``frames_omitted``; :func:`read_npz` then
        says so instead of reporting a missing key.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> write_npz(ds, "experiment.npz")  # doctest: +SKIP
    PosixPath('experiment.npz')
    """
    path = Path(path)
    dataset.validate()
    arrays: dict[str, np.ndarray] = {
        "probeGuess": dataset.probe[0] if dataset.n_modes == 1 else dataset.probe,
        "xcoords": dataset.positions_px[:, 1],
        "ycoords": dataset.positions_px[:, 0],
    }
    if not frames:
        arrays["frames_omitted"] = np.bool_(True)
    elif amplitude:
        arrays["diffraction"] = np.sqrt(dataset.diffraction, dtype=np.float64).astype(np.float32)
    else:
        arrays["diff3d"] = dataset.diffraction
    if dataset.object is not None:
        arrays["objectGuess"] = dataset.object
    if dataset.mask is not None:
        arrays["mask"] = dataset.mask
    for key in _GEOMETRY:
        if getattr(dataset, key) is not None:
            arrays[key] = np.float64(getattr(dataset, key))
    metadata = dict(dataset.metadata)
    scan_index = metadata.pop("scan_index", None)
    if scan_index is not None and len(scan_index) == dataset.n_frames:
        arrays["scan_index"] = np.asarray(scan_index, dtype=np.int64)
    arrays["metadata_json"] = np.array(metadata_to_json(metadata))
    save = np.savez_compressed if compress else np.savez
    # A handle: numpy would append ".npz" to a bare name. Written beside the target and
    # renamed onto it, so a failed write (full disk, quota) leaves the previous file intact.
    with replacing(path) as partial, open(partial, "wb") as handle:
        save(handle, **arrays)
    return path

