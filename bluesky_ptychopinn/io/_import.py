"""A foreign layout (a bare HDF5 or NPZ of frames, positions and maybe a probe) to a dataset in
the project's conventions, every conversion recorded (``bluesky-ptychopinn import``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..geometry import object_pixel_size_m
from ._checks import _load, finite_range, npz_header, open_hdf5
from ._dataset import PtychoDataset
from ._npz import open_npz

__all__ = ["import_arrays", "list_arrays"]


def list_arrays(path: str | Path) -> dict[str, tuple]:
    """Every array in an HDF5 or NPZ file: key -> shape (to find the keys to import).

    Shapes come from the HDF5 metadata or the ``.npy`` headers: no array is read.
    """
    path = Path(path)
    if h5py.is_hdf5(path):
        found: dict[str, tuple] = {}
        with open_hdf5(path) as f:
            f.visititems(lambda name, obj: found.__setitem__(name, obj.shape)
                         if isinstance(obj, h5py.Dataset) else None)
        return found
    with open_npz(path) as data:
        return {k: npz_header(data, k, path)[0] for k in data.files}


def _read(path: Path, key: str) -> np.ndarray:
    """One array, through the readers' checks: a text file, a group where an array is
    expected, an array larger than memory or a corrupt one is a :class:`FileFormatError`."""
    try:
        if h5py.is_hdf5(path):
            with open_hdf5(path) as f:
                return _load(f, key, path)
        with open_npz(path) as data:
            return _load(data, key, path)
    except KeyError:
        keys = ", ".join(f"{k} {v}" for k, v in list_arrays(path).items())
        raise FileFormatError(path, key, f"no such array (the file has: {keys})") from None


def import_arrays(
    src: str | Path,
    *,
    frames: str,
    positions: str,
    probe: str | None = None,
    frames_are: Literal["counts", "amplitude"] = "counts",
    dc: Literal["centre", "corner"] = "centre",
    positions_are: Literal["centre", "corner"] = "centre",
    units: Literal["px", "m"] = "m",
    yx: bool = True,
    energy_ev: float,
    distance_m: float,
    detector_pixel_m: float,
) -> PtychoDataset:
    """Read arrays from ``src`` and convert them to the project's conventions.

    Parameters
    ----------
    src : path
        HDF5 or NPZ file.
    frames, positions, probe : str
        Keys (HDF5 paths) of the (n, N, N) frames, the (n, 2) positions and the (N, N) or
        (M, N, N) complex probe; without ``probe`` the probe is estimated from the mean pattern
        (then refine it: ``reconstruct`` with probe refinement).
    frames_are : {"counts", "amplitude"}
        Amplitudes (sqrt of counts) are squared.
    dc : {"centre", "corner"}
        Where the zero frequency is; a corner DC is shifted to the centre.
    positions_are : {"centre", "corner"}
        Probe centres, or the top-left corners of the probe window (moved by N/2).
    units : {"px", "m"}
        Object pixels, or metres (divided by the object pixel size of the geometry).
    yx : bool
        Positions are (y, x) per row; ``False``: (x, y).
    energy_ev, distance_m, detector_pixel_m : float
        The geometry.

    Returns
    -------
    PtychoDataset
        With ``metadata["conversions"]`` saying what was done, and ``metadata["import"]`` the
        source and options.
    """
    src = Path(src)
    conversions: list[str] = []
    if frames_are not in ("counts", "amplitude"):
        raise InvalidInputError(f"--frames-are: counts or amplitude, got {frames_are!r}")
    raw = _read(src, frames)
    if raw.dtype.kind not in "uif":
        what = ("complex values (a wave, not a measurement: store |psi|^2 as counts or |psi| "
                "as amplitudes)" if raw.dtype.kind == "c" else f"dtype {raw.dtype}")
        raise FileFormatError(src, frames, f"expected real counts or amplitudes, got {what}")
    if raw.ndim != 3 or raw.shape[1] != raw.shape[2]:
        raise FileFormatError(src, frames, f"expected (n, N, N) frames, got {raw.shape}")
    if 0 in raw.shape:  # nothing to reconstruct, and the positions' minimum would fail
        raise FileFormatError(src, frames, f"no frames: shape {raw.shape} (expected n >= 1 "
                              "frames of N >= 1 pixels)")
    counts = raw.astype(np.float32)  # float32 throughout: the dataset's dtype, half the memory
    del raw
    n = counts.shape[-1]
    if frames_are == "amplitude":
        low, _ = finite_range(counts)
        if low < 0:
            raise FileFormatError(src, frames, f"expected amplitudes >= 0 (sqrt of counts), got "
                                  f"negative values (min {low:g})")
        np.square(counts, out=counts)  # the closest float32 to amplitude**2, in place
        conversions.append(f"{frames}: amplitude -> squared to photon counts")
    if dc == "corner":
        counts = np.fft.fftshift(counts, axes=(-2, -1))
        conversions.append("DC at the corner -> fftshift to the centre (N//2, N//2)")
    elif dc != "centre":
        raise InvalidInputError(f"--dc: centre or corner, got {dc!r}")
    pos = _read(src, positions).astype(np.float64)
    if pos.ndim != 2 or pos.shape != (len(counts), 2):
        if pos.ndim == 2 and pos.shape == (2, len(counts)):
            pos = pos.T
            conversions.append(f"{positions}: (2, n) -> transposed to (n, 2)")
        else:
            raise FileFormatError(src, positions, f"expected ({len(counts)}, 2) positions, got "
                                  f"{pos.shape}")
    if not yx:
        pos = pos[:, ::-1]
        conversions.append(f"{positions}: (x, y) -> (y, x)")
    dx = object_pixel_size_m(energy_ev, distance_m, detector_pixel_m, n)
    if units == "m":
        pos = pos / dx
        conversions.append(f"positions in metres -> object pixels of {dx:.4g} m")
    elif units != "px":
        raise InvalidInputError(f"--units: px or m, got {units!r}")
    if positions_are == "corner":
        pos = pos + n / 2
        conversions.append(f"top-left corners of the probe window -> probe centres (+{n / 2:g})")
    elif positions_are != "centre":
        raise InvalidInputError(f"--positions-are: centre or corner, got {positions_are!r}")
    # The object frame starts a frame's half plus a margin before the first probe centre.
    shift = n / 2 + 8 - pos.min(axis=0)
    pos = pos + shift
    conversions.append(f"positions shifted by {shift.round(3).tolist()} px so the scan lies "
                       "inside the object")
    if probe is not None:
        probe_arr = _read(src, probe).astype(np.complex64)
    else:
        from ..recon import probe_from_frames

        probe_arr = probe_from_frames(counts)
        conversions.append("no probe in the file: estimated from the mean pattern (refine it)")
    return PtychoDataset(counts, pos, probe_arr, energy_ev=energy_ev,
                         detector_distance_m=distance_m, detector_pixel_size_m=detector_pixel_m,
                         metadata={"conversions": conversions,
                                   "import": {"source": str(src), "frames": frames,
                                              "positions": positions, "probe": probe,
                                              "frames_are": frames_are, "dc": dc,
                                              "positions_are": positions_are, "units": units,
                                              "yx": yx}})
