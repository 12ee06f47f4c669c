"""The in-memory dataset every reader returns and every writer takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..physics import object_pixel_size_m as _dx

__all__ = ["PtychoDataset"]


@dataclass
class PtychoDataset:
    """A ptychography experiment in the project's conventions (CONVENTIONS.md).

    Attributes
    ----------
    diffraction : numpy.ndarray
        (n, N, N) photon counts, DC at (N//2, N//2).
    positions_px : numpy.ndarray
        (n, 2) probe centres (y, x) in object pixels (origin: centre of pixel (0, 0)).
    probe : numpy.ndarray
        complex64 (M, N, N) incoherent modes at the object pixel size.
    energy_ev, detector_distance_m, detector_pixel_size_m, object_pixel_size_m : float or None
        Geometry (SI, eV).
    mask : numpy.ndarray or None
        (N, N) bool, True = valid pixel.
    object : numpy.ndarray or None
        complex64 (H, W) truth or reference reconstruction.
    metadata : dict
        Source format and every conversion applied on reading.
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
        self.probe = np.asarray(self.probe)
        if self.probe.ndim == 2:
            self.probe = self.probe[None]
        if (self.object_pixel_size_m is None and self.energy_ev and self.detector_distance_m
                and self.detector_pixel_size_m):
            self.object_pixel_size_m = _dx(self.energy_ev, self.detector_distance_m,
                                           self.detector_pixel_size_m,
                                           int(np.shape(self.diffraction)[-1]))

    def validate(self, path: object = "<memory>") -> PtychoDataset:
        """Check every invariant; raise :class:`FileFormatError` naming the field."""
        def bad(name, problem):
            raise FileFormatError(path, name, problem)

        d = np.asarray(self.diffraction)
        if d.dtype.kind not in "uif":
            bad("diffraction", f"expected real counts (int or float), got dtype {d.dtype}")
        if d.ndim != 3 or d.shape[1] != d.shape[2]:
            bad("diffraction", f"expected (n, N, N) square frames, got shape {d.shape}")
        if d.dtype.kind == "f" and not np.isfinite(d).all():
            frames = np.flatnonzero(~np.isfinite(d.reshape(len(d), -1)).all(axis=1))
            bad("diffraction", f"non-finite values in frame(s) {frames[:10].tolist()}")
        if (d < 0).any():
            bad("diffraction", "negative photon counts")
        p = np.asarray(self.positions_px)
        if p.ndim != 2 or p.shape[1] != 2:
            bad("positions", f"expected (n, 2) (y, x), got shape {p.shape}")
        if len(p) != len(d):
            bad("positions", f"{len(p)} positions for {len(d)} frames (inconsistent lengths)")
        if not np.isfinite(p).all():
            bad("positions", "non-finite positions")
        pr = self.probe
        if pr.ndim != 3 or pr.shape[-2:] != d.shape[1:]:
            bad("probe", f"expected (M, {d.shape[1]}, {d.shape[2]}), got shape {pr.shape}")
        if not np.isfinite(pr).all():
            bad("probe", "non-finite values")
        if self.mask is not None and np.shape(self.mask) != d.shape[1:]:
            bad("mask", f"expected {d.shape[1:]}, got {np.shape(self.mask)}")
        if self.object is not None:
            o = np.asarray(self.object)
            if o.ndim != 2:
                bad("object", f"expected (H, W), got shape {o.shape}")
            if not np.isfinite(o).all():
                bad("object", "non-finite values")
        for name in ("energy_ev", "detector_distance_m", "detector_pixel_size_m",
                     "object_pixel_size_m"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                bad(name, f"expected a positive number, got {value!r}")
        return self

    @property
    def frame_size(self) -> int:
        return int(np.shape(self.diffraction)[-1])

    def require_geometry(self) -> None:
        """Raise if energy / distance / pixel size are missing (needed for metres)."""
        missing = [k for k in ("energy_ev", "detector_distance_m", "detector_pixel_size_m")
                   if getattr(self, k) is None]
        if missing:
            raise InvalidInputError(f"dataset lacks geometry {missing}")
