"""Stage metres <-> object pixels with an origin in pixels, and the experiment geometry.

Thin wrappers over :mod:`bluesky_ptychopinn.geometry`, where the conversion lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..geometry import (
    HC_EV_M,
    object_pixel_size_m,
    positions_m_to_px,
    positions_px_to_m,
    wavelength_m,
)

__all__ = [
    "ExperimentGeometry",
    "HC_EV_M",
    "wavelength_m",
    "object_pixel_size_m",
    "stage_to_pixels",
    "pixels_to_stage",
    "rescale_positions",
]


def stage_to_pixels(
    positions_m: np.ndarray,
    pixel_size_m: float,
    *,
    origin_m: np.ndarray | tuple[float, float] = (0.0, 0.0),
    origin_px: np.ndarray | tuple[float, float] = (0.0, 0.0),
    sign: int = 1,
) -> np.ndarray:
    """Convert stage positions (metres, lab frame) to probe centres in object pixels.

    The one place where origin, sign and pixel size meet::

        p_px = origin_px + sign * (p_m - origin_m) / pixel_size_m

    Parameters
    ----------
    positions_m : array_like
        (n, 2) stage positions (y, x) in metres.
    pixel_size_m : float
        Object pixel size in metres.
    origin_m : array_like of 2 floats
        Stage position that maps to ``origin_px``.
    origin_px : array_like of 2 floats
        Object-pixel coordinate of ``origin_m``.
    sign : {1, -1}
        ``+1``: the stage coordinate *is* the probe position on the sample (CXI and pty-chi
        convention, our default). ``-1``: moving the stage by +d moves the beam by -d on the sample.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 (y, x) object pixels.

    Examples
    --------
    >>> stage_to_pixels([[1e-6, -2e-6]], 1e-8, origin_px=(100, 100))
    array([[ 200., -100.]])
    """
    # The conversion itself lives in bluesky_ptychopinn.geometry (numpy only, shared with io).
    relative = positions_m_to_px(positions_m, pixel_size_m, origin_m=origin_m, sign=sign)
    return np.asarray(origin_px, dtype=float) + relative


def pixels_to_stage(
    positions_px: np.ndarray,
    pixel_size_m: float,
    *,
    origin_m: np.ndarray | tuple[float, float] = (0.0, 0.0),
    origin_px: np.ndarray | tuple[float, float] = (0.0, 0.0),
    sign: int = 1,
) -> np.ndarray:
    """Inverse of :func:`stage_to_pixels` (same arguments)."""
    relative = np.asarray(positions_px, dtype=np.float64) - np.asarray(origin_px, dtype=float)
    return positions_px_to_m(relative, pixel_size_m, origin_m=origin_m, sign=sign)


def rescale_positions(positions_px: np.ndarray, old_pixel_size: float, new_pixel_size: float):
    """Re-express positions when the object pixel size changes (e.g. frames cropped N -> N/2).

    With the origin at the centre of pixel (0, 0) this is a pure scaling.

    Raises
    ------
    InvalidInputError
        A pixel size that is not finite and > 0.
    """
    for name, value in (("old_pixel_size", old_pixel_size), ("new_pixel_size", new_pixel_size)):
        if not (np.isfinite(value) and value > 0):
            raise InvalidInputError(f"{name}: expected a finite pixel size > 0, got {value!r}")
    return np.asarray(positions_px, dtype=np.float64) * (old_pixel_size / new_pixel_size)


@dataclass(frozen=True)
class ExperimentGeometry:
    """Beamline geometry of a simulated experiment (SI units, energy in eV).

    The defaults give 64 x 64 frames and an object pixel of about 44 nm
    (8.8 keV, 1.5 m, 75 um pixels), typical of a hard X-ray microprobe.
    """

    energy_ev: float = 8_800.0
    detector_distance_m: float = 1.5
    detector_pixel_size_m: float = 75e-6
    frame_size: int = 64

    @property
    def object_pixel_size_m(self) -> float:
        """dx = lambda z / (N p)."""
        return object_pixel_size_m(
            self.energy_ev, self.detector_distance_m, self.detector_pixel_size_m, self.frame_size
        )
