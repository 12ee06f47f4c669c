"""Geometry: object pixel size, and the one conversion between stage metres and object pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "ExperimentGeometry",
    "HC_EV_M",
    "wavelength_m",
    "object_pixel_size_m",
    "stage_to_pixels",
    "pixels_to_stage",
    "rescale_positions",
]

#: h * c in eV * metres; lambda = HC_EV_M / E.
HC_EV_M = 1.23984198e-6


def wavelength_m(energy_ev: float) -> float:
    """X-ray wavelength in metres for a photon energy in eV."""
    if not energy_ev > 0:
        raise InvalidInputError(f"energy_ev: expected a positive energy in eV, got {energy_ev!r}")
    return HC_EV_M / energy_ev


def object_pixel_size_m(
    energy_ev: float, detector_distance_m: float, detector_pixel_size_m: float, n_pixels: int
) -> float:
    """Real-space pixel size of a far-field geometry: dx = lambda z / (N p).

    Examples
    --------
    >>> round(object_pixel_size_m(10_000, 2.0, 75e-6, 128) * 1e9, 2)  # nm
    25.83
    """
    for name, value in (
        ("detector_distance_m", detector_distance_m),
        ("detector_pixel_size_m", detector_pixel_size_m),
        ("n_pixels", n_pixels),
    ):
        if not value > 0:
            raise InvalidInputError(f"{name}: expected a positive value, got {value!r}")
    return wavelength_m(energy_ev) * detector_distance_m / (n_pixels * detector_pixel_size_m)


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
    pos = np.asarray(positions_m, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise InvalidInputError(f"positions_m: expected (n, 2) (y, x) metres, got {pos.shape}")
    if not np.isfinite(pos).all():
        raise InvalidInputError("positions_m: contains NaN or inf")
    if sign not in (1, -1):
        raise InvalidInputError(f"sign: expected +1 or -1, got {sign!r}")
    if not pixel_size_m > 0:
        raise InvalidInputError(f"pixel_size_m: expected > 0, got {pixel_size_m!r}")
    return np.asarray(origin_px, float) + sign * (pos - np.asarray(origin_m, float)) / pixel_size_m


def pixels_to_stage(
    positions_px: np.ndarray,
    pixel_size_m: float,
    *,
    origin_m: np.ndarray | tuple[float, float] = (0.0, 0.0),
    origin_px: np.ndarray | tuple[float, float] = (0.0, 0.0),
    sign: int = 1,
) -> np.ndarray:
    """Inverse of :func:`stage_to_pixels` (same arguments)."""
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise InvalidInputError(f"positions_px: expected (n, 2), got {pos.shape}")
    if sign not in (1, -1):
        raise InvalidInputError(f"sign: expected +1 or -1, got {sign!r}")
    return np.asarray(origin_m, float) + sign * (pos - np.asarray(origin_px, float)) * pixel_size_m


def rescale_positions(positions_px: np.ndarray, old_pixel_size: float, new_pixel_size: float):
    """Re-express positions when the object pixel size changes (e.g. frames cropped N -> N/2).

    With the origin at the centre of pixel (0, 0) this is a pure scaling.
    """
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
