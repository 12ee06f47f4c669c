"""The in-memory dataset every reader returns and every writer takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..geometry import object_pixel_size_m as _object_pixel_size_m

__all__ = ["PtychoDataset"]

_GEOMETRY = ("energy_ev", "detector_distance_m", "detector_pixel_size_m", "object_pixel_size_m")
#: Relative tolerance between a stored object pixel size and lambda z / (N p).
_DX_RTOL = 1e-6


def _as_float(value: object) -> object:
    """``float(value)`` when possible; anything else is left for :meth:`validate` to report."""
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value


def _as_complex64(value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in "uifc":  # numbers: the convention is complex64
        return array.astype(np.complex64, copy=False)
    return array  # strings / objects: validate() names the field


@dataclass(repr=False)
class PtychoDataset:
    """A ptychography experiment in the project's conventions (docs/conventions.md).

    Construction normalises containers only (arrays become numpy arrays, a bare (N, N) probe
    becomes (1, N, N), probe and object become complex64, positions float64) and fills
    ``object_pixel_size_m`` from the geometry when it is not given. :meth:`validate` checks
    every invariant; readers and writers call it.

    Attributes
    ----------
    diffraction : numpy.ndarray
        (n, N, N) photon counts (float or integer, never amplitudes), DC at (N//2, N//2).
    positions_px : numpy.ndarray
        (n, 2) float64 probe centres (y, x) in object pixels; the origin is the centre of
        object pixel (0, 0).
    probe : numpy.ndarray
        complex64 (M, N, N) incoherent modes sampled at the object pixel size.
    energy_ev : float or None
        Photon energy in eV.
    detector_distance_m, detector_pixel_size_m : float or None
        Sample-detector distance and detector pixel size in metres.
    object_pixel_size_m : float or None
        dx = lambda z / (N p_det); computed from the three above when not given.
    mask : numpy.ndarray or None
        (N, N) bool, True = valid pixel.
    object : numpy.ndarray or None
        complex64 (H, W) ground truth or reference reconstruction.
    metadata : dict
        ``source``, ``format`` and ``conversions`` (list of str, what a reader changed) plus
        free-form provenance (JSON-serialisable values survive a file round trip).

    Examples
    --------
    >>> import numpy as np
    >>> ds = PtychoDataset(np.zeros((3, 8, 8), np.float32), np.full((3, 2), 10.0),
    ...                    np.ones((8, 8)), energy_ev=8000, detector_distance_m=1.0,
    ...                    detector_pixel_size_m=75e-6)
    >>> ds.validate().probe.shape, round(ds.object_pixel_size_m * 1e9, 2)
    ((1, 8, 8), 258.3)
    """

    diffraction: np.ndarray
    positions_px: np.ndarray
    probe: np.ndarray
    energy_ev: float | None = None
    detector_distance_m: float | None = None
    detector_pixel_size_m: float | None = None
    object_pixel_size_m: float | None = None
    mask: np.ndarray | None = None
    object: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.diffraction = np.asarray(self.diffraction)
        positions = np.asarray(self.positions_px)
        self.positions_px = positions.astype(np.float64) if positions.dtype.kind in "uif" \
            else positions
        self.probe = _as_complex64(self.probe)
        if self.probe.ndim == 2:
            self.probe = self.probe[None]
        if self.object is not None:
            self.object = _as_complex64(self.object)
        if self.mask is not None:
            self.mask = np.asarray(self.mask)
        for name in _GEOMETRY:
            setattr(self, name, _as_float(getattr(self, name)))
        if self.object_pixel_size_m is None and self.has_geometry:
            try:
                self.object_pixel_size_m = _object_pixel_size_m(
                    self.energy_ev, self.detector_distance_m, self.detector_pixel_size_m,
                    self.frame_size)
            except (InvalidInputError, IndexError):
                pass  # invalid geometry or frames: validate() reports the field

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Number of frames n."""
        return int(np.shape(self.diffraction)[0])

    @property
    def frame_size(self) -> int:
        """Frame side N in detector pixels."""
        return int(np.shape(self.diffraction)[-1])

    @property
    def n_modes(self) -> int:
        """Number of incoherent probe modes M."""
        return int(self.probe.shape[0])

    @property
    def has_geometry(self) -> bool:
        """True when energy, distance and detector pixel size are all known."""
        return all(getattr(self, k) is not None for k in _GEOMETRY[:3])

    def require_geometry(self, purpose: str = "this operation") -> None:
        """Raise :class:`InvalidInputError` naming the geometry fields that are missing."""
        missing = [k for k in _GEOMETRY[:3] if getattr(self, k) is None]
        if missing:
            raise InvalidInputError(f"PtychoDataset: {purpose} needs {', '.join(missing)} "
                                    "(None given)")

    def __repr__(self) -> str:
        parts = [f"diffraction={self.diffraction.shape} {self.diffraction.dtype}",
                 f"probe={self.probe.shape}"]
        parts += [f"{k}={getattr(self, k):.6g}" for k in _GEOMETRY
                  if isinstance(getattr(self, k), float)]
        if self.mask is not None:
            parts.append(f"mask={np.shape(self.mask)}")
        if self.object is not None:
            parts.append(f"object={np.shape(self.object)}")
        return f"PtychoDataset({', '.join(parts)})"

    # -- validation -----------------------------------------------------------------------------
    def validate(
        self, path: str | Path | None = None, fields: Mapping[str, str] | None = None
    ) -> PtychoDataset:
        """Check every invariant and return ``self``.

        Parameters
        ----------
        path : str or pathlib.Path, optional
            The file the dataset came from or goes to. Given: problems raise
            :class:`FileFormatError` naming the file; else :class:`InvalidInputError`.
        fields : mapping, optional
            Attribute name -> the field's name in the file (e.g. ``{"diffraction":
            "/entry_1/instrument_1/detector_1/data"}``), so messages name what is on disk.

        Returns
        -------
        PtychoDataset
            ``self``.

        Raises
        ------
        InvalidInputError
            In memory: a field has the wrong shape, dtype or values.
        FileFormatError
            Same, for a dataset read from or written to ``path``.
        """
        names = dict(fields or {})

        def bad(attribute: str, problem: str) -> NoReturn:
            name = names.get(attribute, attribute)
            if path is not None:
                raise FileFormatError(path, name, problem)
            raise InvalidInputError(f"PtychoDataset.{name}: {problem}")

        n, size = self._check_diffraction(bad)
        self._check_positions(bad, n)
        self._check_probe(bad, size)
        self._check_mask(bad, size)
        self._check_object(bad)
        self._check_geometry(bad, size)
        if not isinstance(self.metadata, dict):
            bad("metadata", f"expected a dict, got {type(self.metadata).__name__}")
        return self

    def _check_diffraction(self, bad) -> tuple[int, int]:
        d = self.diffraction
        if d.dtype.kind not in "uif":
            bad("diffraction", f"expected photon counts (int or float), got dtype {d.dtype}")
        if d.ndim != 3 or d.shape[1] != d.shape[2] or d.shape[0] == 0 or d.shape[1] == 0:
            bad("diffraction", f"expected (n, N, N) square frames with n >= 1, got shape {d.shape}")
        flat = d.reshape(len(d), -1)
        if d.dtype.kind == "f":
            broken = np.flatnonzero(~np.isfinite(flat).all(axis=1))
            if broken.size:
                bad("diffraction", f"non-finite values (NaN/inf) in {broken.size} frame(s), "
                    f"first {broken[:10].tolist()}")
        if d.dtype.kind != "u":
            negative = np.flatnonzero((flat < 0).any(axis=1))
            if negative.size:
                bad("diffraction", f"expected photon counts >= 0, got negative values (min "
                    f"{flat.min():g}) in {negative.size} frame(s), first {negative[:10].tolist()}")
        return d.shape[0], d.shape[1]

    def _check_positions(self, bad, n: int) -> None:
        p = self.positions_px
        if p.dtype.kind not in "uif":
            bad("positions_px", f"expected real numbers, got dtype {p.dtype}")
        if p.ndim != 2 or p.shape[1] != 2:
            bad("positions_px", f"expected shape (n, 2) in (y, x) order, got {p.shape}")
        if len(p) != n:
            bad("positions_px", f"inconsistent lengths: {len(p)} positions for {n} frames")
        if not np.isfinite(p).all():
            rows = np.flatnonzero(~np.isfinite(p).all(axis=1))
            bad("positions_px", f"non-finite positions at index {rows[:10].tolist()}")

    def _check_probe(self, bad, size: int) -> None:
        pr = self.probe
        if pr.dtype != np.complex64:
            bad("probe", f"expected complex numbers, got dtype {pr.dtype}")
        if pr.ndim != 3 or pr.shape[1:] != (size, size) or pr.shape[0] == 0:
            bad("probe", f"expected (M, {size}, {size}) to match the frames, got shape {pr.shape}")
        if not np.isfinite(pr).all():
            bad("probe", "non-finite values (NaN/inf)")
        if not np.any(pr):
            bad("probe", "all zero")

    def _check_mask(self, bad, size: int) -> None:
        if self.mask is None:
            return
        m = self.mask
        if m.dtype != np.bool_:
            bad("mask", f"expected bool (True = valid pixel), got dtype {m.dtype}")
        if m.shape != (size, size):
            bad("mask", f"expected shape ({size}, {size}) like a frame, got {m.shape}")
        if not m.any():
            bad("mask", "no valid pixel (all False)")

    def _check_object(self, bad) -> None:
        if self.object is None:
            return
        o = self.object
        if o.dtype != np.complex64:
            bad("object", f"expected complex numbers, got dtype {o.dtype}")
        if o.ndim != 2 or 0 in o.shape:
            bad("object", f"expected a 2-D (H, W) object, got shape {o.shape}")
        if not np.isfinite(o).all():
            bad("object", "non-finite values (NaN/inf)")

    def _check_geometry(self, bad, size: int) -> None:
        for name in _GEOMETRY:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, float) or not (np.isfinite(value) and value > 0):
                bad(name, f"expected a positive finite number, got {value!r}")
        if self.has_geometry and self.object_pixel_size_m is not None:
            expected = _object_pixel_size_m(self.energy_ev, self.detector_distance_m,
                                            self.detector_pixel_size_m, size)
            if abs(self.object_pixel_size_m - expected) > _DX_RTOL * expected:
                bad("object_pixel_size_m", f"expected lambda z / (N p) = {expected:.6e} m from "
                    f"energy, distance and detector pixel, got {self.object_pixel_size_m:.6e}")
