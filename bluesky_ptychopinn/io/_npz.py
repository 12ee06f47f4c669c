"""The PtychoPINN NPZ contract: ``diffraction`` (amplitudes) or ``diff3d`` (intensities),
``probeGuess``, ``objectGuess``, ``xcoords``/``ycoords`` (object pixels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ._checks import optional, require
from ._dataset import PtychoDataset

__all__ = ["read_npz", "write_npz"]

_GEOMETRY = ("energy_ev", "detector_distance_m", "detector_pixel_size_m", "object_pixel_size_m")


def read_npz(path: str | Path) -> PtychoDataset:
    """Read a PtychoPINN NPZ file.

    ``diffraction`` holds *amplitudes* (sqrt of counts) in the PtychoPINN contract and is
    squared here; ``diff3d`` holds counts and is taken as is. Either way the conversion is
    recorded in ``metadata["conversions"]``. Positions: ``ycoords``, ``xcoords`` are probe
    centres in object pixels, mapped to (y, x).
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FileFormatError(path, "", f"not a readable NPZ file ({exc})") from exc
    with data:
        conversions = []
        if "diffraction" in data:
            amp = require(data, "diffraction", path, ndim=3, kind="uif")
            if np.isfinite(amp).all() and (amp < 0).any():
                raise FileFormatError(path, "diffraction", "negative amplitudes")
            counts = amp.astype(np.float64) ** 2
            conversions.append("diffraction was amplitude: squared to photon counts")
        elif "diff3d" in data:
            counts = require(data, "diff3d", path, ndim=3, kind="uif")
            conversions.append("diff3d taken as photon counts")
        else:
            raise FileFormatError(path, "diffraction", "missing (need 'diffraction' or 'diff3d')")
        probe = require(data, "probeGuess", path)
        if probe.ndim not in (2, 3):
            raise FileFormatError(path, "probeGuess", f"expected (N, N) or (M, N, N), got "
                                  f"shape {probe.shape}")
        x = require(data, "xcoords", path, ndim=1, kind="uif")
        y = require(data, "ycoords", path, ndim=1, kind="uif")
        if len(x) != len(y):
            raise FileFormatError(path, "ycoords", f"{len(y)} values but xcoords has {len(x)}")
        obj = optional(data, "objectGuess")
        mask = optional(data, "mask")
        geometry = {k: float(v) for k in _GEOMETRY if (v := optional(data, k)) is not None}
        ds = PtychoDataset(
            diffraction=counts.astype(np.float32),
            positions_px=np.stack([y, x], axis=1).astype(np.float64),
            probe=probe.astype(np.complex64),
            mask=None if mask is None else mask.astype(bool),
            object=None if obj is None else obj.astype(np.complex64),
            metadata={"source": str(path), "format": "ptychopinn-npz",
                      "conversions": conversions},
            **geometry,
        )
    return ds.validate(path)


def write_npz(ds: PtychoDataset, path: str | Path, *, amplitude: bool = True) -> Path:
    """Write ``ds`` in the PtychoPINN NPZ contract (``diffraction`` as amplitudes by default,
    ``diff3d`` counts with ``amplitude=False``) plus our optional geometry keys."""
    ds.validate(path)
    path = Path(path)
    arrays = {
        "probeGuess": ds.probe[0] if ds.probe.shape[0] == 1 else ds.probe,
        "xcoords": ds.positions_px[:, 1],
        "ycoords": ds.positions_px[:, 0],
    }
    counts = np.asarray(ds.diffraction, dtype=np.float32)
    if amplitude:
        arrays["diffraction"] = np.sqrt(counts)
    else:
        arrays["diff3d"] = counts
    if ds.object is not None:
        arrays["objectGuess"] = ds.object
    if ds.mask is not None:
        arrays["mask"] = np.asarray(ds.mask, bool)
    for key in _GEOMETRY:
        if getattr(ds, key) is not None:
            arrays[key] = np.float64(getattr(ds, key))
    np.savez_compressed(path, **arrays)
    return path
