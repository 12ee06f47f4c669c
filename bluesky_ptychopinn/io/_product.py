"""Read-only: the ptychodus product HDF5 (probe, object, positions of a reconstruction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError
from ._checks import require

__all__ = ["Reconstruction", "read_product"]


@dataclass
class Reconstruction:
    """A reconstruction product: no diffraction, just its results."""

    probe: np.ndarray
    object: np.ndarray
    positions_px: np.ndarray
    pixel_size_m: float
    energy_ev: float | None
    metadata: dict


def read_product(path: str | Path) -> Reconstruction:
    """Read a ptychodus product file.

    ``probe`` (opr, modes, h, w) -> (modes, h, w) of the first OPR mode; ``object``
    (layers, H, W) -> first layer; positions from ``probe_position_{x,y}_m`` relative to the
    object centre (``center_{x,y}_m`` attributes) in object pixels.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FileFormatError(path, "", f"not a readable HDF5 file ({exc})") from exc
    with f:
        probe = require(f, "probe", path, kind="c")
        while probe.ndim > 3:
            probe = probe[0]
        obj_ds = f["object"] if "object" in f else None
        obj = require(f, "object", path, kind="c")
        obj = obj[0] if obj.ndim == 3 else obj
        if obj.ndim != 2:
            raise FileFormatError(path, "object", f"expected (layers, H, W), got {obj.shape}")
        attrs = obj_ds.attrs
        for key in ("pixel_width_m", "center_x_m", "center_y_m"):
            if key not in attrs:
                raise FileFormatError(path, f"object@{key}", "missing attribute")
        dx = float(attrs["pixel_width_m"])
        x = require(f, "probe_position_x_m", path, ndim=1, kind="f")
        y = require(f, "probe_position_y_m", path, ndim=1, kind="f")
        if len(x) != len(y):
            raise FileFormatError(path, "probe_position_y_m", f"{len(y)} values, x has {len(x)}")
        h, w = obj.shape
        cy = (y - float(attrs["center_y_m"])) / dx + (h - 1) / 2
        cx = (x - float(attrs["center_x_m"])) / dx + (w - 1) / 2
        energy = f.attrs.get("photon_energy_eV")
        return Reconstruction(
            probe=probe.astype(np.complex64), object=obj.astype(np.complex64),
            positions_px=np.stack([cy, cx], axis=1), pixel_size_m=dx,
            energy_ev=None if energy is None else float(energy),
            metadata={"source": str(path), "format": "ptychodus-product",
                      **{k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}},
        )
