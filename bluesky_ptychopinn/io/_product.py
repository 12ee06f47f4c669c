"""Read-only: the ptychodus product HDF5 (the probe, object and positions of a reconstruction).

Layout: file attributes ``photon_energy_eV`` (older files: ``probe_energy_eV``),
``detector_object_distance_m``; ``probe`` (opr, modes, h, w) complex with ``pixel_width_m`` /
``pixel_height_m`` attributes; ``object`` (layers, H, W) complex with ``center_x_m``,
``center_y_m``, ``pixel_width_m``, ``pixel_height_m``; ``probe_position_x_m``,
``probe_position_y_m``, ``probe_position_indexes``; ``loss_epochs``, ``loss_values``.

Positions: ptychodus puts the object centre (``center_x_m``, ``center_y_m``) at pixel index
((W - 1) / 2, (H - 1) / 2) (its centred-pixel convention), so a probe at ``x_m`` sits at
``(x_m - center_x_m) / pixel_width_m + (W - 1) / 2`` object pixels; with our origin at the centre
of pixel (0, 0) this is directly our position. (ptychodus releases before 2025 used W / 2, half
a pixel off.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..geometry import positions_m_to_px
from ._checks import COMPLEX, REAL, nonempty, open_hdf5, optional, require

__all__ = ["Reconstruction", "read_product"]

FORMAT = "ptychodus-product"
_ENERGY_ATTRS = ("photon_energy_eV", "probe_energy_eV")


@dataclass(repr=False)
class Reconstruction:
    """A reconstruction product: its probe, object and positions (no diffraction).

    Attributes
    ----------
    probe : numpy.ndarray
        complex64 (M, N, N) incoherent modes (first OPR mode).
    object : numpy.ndarray
        complex64 (H, W) (first layer).
    positions_px : numpy.ndarray
        (n, 2) float64 probe centres (y, x) in object pixels (origin: centre of pixel (0, 0)).
    pixel_size_m : (float, float)
        Object pixel size (dy, dx) in metres.
    probe_pixel_size_m : (float, float)
        Probe pixel size (dy, dx) in metres (the object's when the file does not say).
    energy_ev : float or None
        Photon energy in eV.
    detector_distance_m : float or None
        Sample-detector distance in metres.
    position_indexes : numpy.ndarray or None
        (n,) frame index of every position.
    loss_values : numpy.ndarray or None
        Cost per epoch.
    metadata : dict
        ``source``, ``format``, ``conversions`` and the file attributes.
    """

    probe: np.ndarray
    object: np.ndarray
    positions_px: np.ndarray
    pixel_size_m: tuple[float, float]
    probe_pixel_size_m: tuple[float, float]
    energy_ev: float | None = None
    detector_distance_m: float | None = None
    position_indexes: np.ndarray | None = None
    loss_values: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def object_pixel_size_m(self) -> float:
        """The object pixel size of square pixels (raises for non-square ones)."""
        dy, dx = self.pixel_size_m
        if abs(dy - dx) > 1e-9 * dx:
            raise InvalidInputError(f"object pixels are not square: (dy, dx) = ({dy:g}, {dx:g}) m")
        return dx

    def __repr__(self) -> str:
        return (f"Reconstruction(probe={self.probe.shape}, object={self.object.shape}, "
                f"positions={self.positions_px.shape}, pixel_size_m={self.pixel_size_m})")


def _attr_float(node: h5py.HLObject, key: str, path: Path, where: str) -> float | None:
    if key not in node.attrs:
        return None
    try:
        value = float(np.asarray(node.attrs[key]).reshape(()))
    except (TypeError, ValueError) as exc:
        raise FileFormatError(path, f"{where}@{key}", f"expected a number ({exc})") from exc
    if not np.isfinite(value):
        raise FileFormatError(path, f"{where}@{key}", f"expected a finite number, got {value}")
    return value


def _required_attr(node: h5py.HLObject, key: str, path: Path, where: str,
                   positive: bool = False) -> float:
    value = _attr_float(node, key, path, where)
    if value is None:
        raise FileFormatError(path, f"{where}@{key}", "missing attribute (required)")
    if positive and not value > 0:
        raise FileFormatError(path, f"{where}@{key}", f"expected a positive number, got {value}")
    return value


def _probe(f: h5py.File, path: Path, conversions: list[str]) -> np.ndarray:
    probe = require(f, "probe", path, ndim=(2, 3, 4), kinds=COMPLEX + REAL,
                    what="(opr, modes, h, w) complex")
    nonempty(probe, "probe", path, "probe modes")
    if probe.ndim == 4:
        if probe.shape[0] > 1:
            conversions.append(f"probe: kept OPR mode 0 of {probe.shape[0]}")
        probe = probe[0]
    if probe.ndim == 2:
        probe = probe[None]
    if probe.shape[-1] != probe.shape[-2] or not np.isfinite(probe).all():
        raise FileFormatError(path, "probe", f"expected finite square (modes, N, N) modes, got "
                              f"shape {probe.shape}")
    return probe.astype(np.complex64)


def _object(f: h5py.File, path: Path, conversions: list[str]) -> np.ndarray:
    obj = require(f, "object", path, ndim=(2, 3), kinds=COMPLEX + REAL,
                  what="(layers, H, W) complex")
    nonempty(obj, "object", path, "object layer")
    if obj.ndim == 3:
        if obj.shape[0] > 1:
            conversions.append(f"object: kept layer 0 of {obj.shape[0]}")
        obj = obj[0]
    if not np.isfinite(obj).all():
        raise FileFormatError(path, "object", "non-finite values (NaN/inf)")
    return obj.astype(np.complex64)


def _positions_m(f: h5py.File, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    x = require(f, "probe_position_x_m", path, ndim=1, kinds=REAL)
    y = require(f, "probe_position_y_m", path, ndim=1, kinds=REAL)
    if len(x) != len(y):
        raise FileFormatError(path, "probe_position_y_m", f"inconsistent lengths: {len(y)} "
                              f"values, probe_position_x_m has {len(x)}")
    indexes = optional(f, "probe_position_indexes", path, ndim=1, kinds="iu")
    if indexes is not None and len(indexes) != len(x):
        raise FileFormatError(path, "probe_position_indexes", f"inconsistent lengths: "
                              f"{len(indexes)} indexes for {len(x)} positions")
    yx = np.stack([y, x], axis=1).astype(np.float64)
    if not np.isfinite(yx).all():
        raise FileFormatError(path, "probe_position_x_m", "non-finite positions")
    return yx, indexes


def read_product(path: str | Path) -> Reconstruction:
    """Read a ptychodus product file (read only: we never write products).

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.h5`` product.

    Returns
    -------
    Reconstruction
        First OPR mode of the probe (modes, h, w), first object layer, positions in object
        pixels (see the module docstring), pixel sizes, energy, indexes and losses.

    Raises
    ------
    FileFormatError
        Not HDF5, or a dataset / attribute missing or of the wrong shape or dtype; the message
        names the file and the field.

    Examples
    --------
    >>> rec = read_product("product-out.h5")  # doctest: +SKIP
    >>> rec.probe.shape, rec.object.shape  # doctest: +SKIP
    ((2, 128, 128), (812, 790))
    """
    path = Path(path)
    conversions: list[str] = []
    with open_hdf5(path) as f:
        probe = _probe(f, path, conversions)
        obj = _object(f, path, conversions)
        attrs = f["object"]
        dx = _required_attr(attrs, "pixel_width_m", path, "object", positive=True)
        dy = _attr_float(attrs, "pixel_height_m", path, "object") or dx
        cx = _required_attr(attrs, "center_x_m", path, "object")
        cy = _required_attr(attrs, "center_y_m", path, "object")
        probe_dx = _attr_float(f["probe"], "pixel_width_m", path, "probe") or dx
        probe_dy = _attr_float(f["probe"], "pixel_height_m", path, "probe") or probe_dx
        yx_m, indexes = _positions_m(f, path)
        h, w = obj.shape
        # ptychodus: the object centre is pixel index ((W-1)/2, (H-1)/2).
        origin = (cy - (h - 1) / 2 * dy, cx - (w - 1) / 2 * dx)
        positions = positions_m_to_px(yx_m, (dy, dx), origin, 1)
        conversions.append("probe_position_{x,y}_m -> positions_px (y, x) relative to the "
                           "object centre at pixel ((H-1)/2, (W-1)/2)")
        energy = next((_attr_float(f, key, path, "/") for key in _ENERGY_ATTRS
                       if key in f.attrs), None)
        distance = _attr_float(f, "detector_object_distance_m", path, "/")
        losses = optional(f, "loss_values", path, ndim=1, kinds=REAL)
        file_attrs = {key: (value.item() if isinstance(value, np.generic) else
                            value.decode() if isinstance(value, bytes) else value)
                      for key, value in f.attrs.items()}
    return Reconstruction(
        probe=probe, object=obj, positions_px=positions, pixel_size_m=(dy, dx),
        probe_pixel_size_m=(probe_dy, probe_dx), energy_ev=energy, detector_distance_m=distance,
        position_indexes=indexes, loss_values=losses,
        metadata={"source": str(path), "format": FORMAT, "conversions": conversions,
                  "attributes": file_attrs},
    )
