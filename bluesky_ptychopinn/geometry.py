"""Units and the one conversion between positions in metres and object pixels (numpy only).

Our position convention (docs/conventions.md): probe centres, (y, x) = (row, column), in object
pixels whose origin is the *centre* of object pixel (0, 0). Files hold positions in metres in
the lab frame of the sample stage; CXI ``translation`` (x, y) is the sample-stage position,
which we take to be the probe centre on the object (``sign=+1``; y is the row axis). Every
reader and writer goes through :func:`positions_m_to_px` / :func:`positions_px_to_m`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = [
    "EV_TO_J",
    "HC_EV_M",
    "DEFAULT_MARGIN_PX",
    "wavelength_m",
    "object_pixel_size_m",
    "positions_m_to_px",
    "positions_px_to_m",
]

#: Joules per electronvolt (exact, SI 2019): ``energy_j = energy_ev * EV_TO_J``.
EV_TO_J = 1.602176634e-19
#: h * c in eV * metres: ``lambda = HC_EV_M / energy_ev``.
HC_EV_M = 1.23984198e-6
#: Pixels between the outermost probe patch and the object edge when an origin is chosen.
DEFAULT_MARGIN_PX = 1.0


def _positive(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected a positive number, got {value!r}") from None
    if not (np.isfinite(number) and number > 0):
        raise InvalidInputError(f"{name}: expected a positive finite number, got {value!r}")
    return number


def wavelength_m(energy_ev: float) -> float:
    """X-ray wavelength in metres of a photon energy in eV: ``lambda = 1.23984198e-6 / E``.

    Parameters
    ----------
    energy_ev : float
        Photon energy in eV.

    Returns
    -------
    float
        Wavelength in metres.

    Examples
    --------
    >>> round(wavelength_m(10_000) * 1e12, 3)  # pm
    123.984
    """
    return HC_EV_M / _positive("energy_ev", energy_ev)


def object_pixel_size_m(
    energy_ev: float, detector_distance_m: float, detector_pixel_size_m: float, frame_size: int
) -> float:
    """Object (real-space) pixel size of a far-field geometry: ``dx = lambda z / (N p_det)``.

    Parameters
    ----------
    energy_ev : float
        Photon energy in eV.
    detector_distance_m : float
        Sample-detector distance z in metres.
    detector_pixel_size_m : float
        Detector pixel size p_det in metres.
    frame_size : int
        Frame side N in detector pixels.

    Returns
    -------
    float
        dx in metres.

    Examples
    --------
    >>> round(object_pixel_size_m(10_000, 2.0, 75e-6, 128) * 1e9, 2)  # nm
    25.83
    """
    z = _positive("detector_distance_m", detector_distance_m)
    p = _positive("detector_pixel_size_m", detector_pixel_size_m)
    n = _positive("frame_size", frame_size)
    return wavelength_m(energy_ev) * z / (n * p)


def _pixel_pair(pixel_size_m: float | Sequence[float]) -> np.ndarray:
    """Pixel size as a (dy, dx) pair; a scalar means square pixels."""
    sizes = np.broadcast_to(np.asarray(pixel_size_m, dtype=np.float64), (2,)).copy()
    for value in sizes:
        _positive("pixel_size_m", value)
    return sizes


def _positions(name: str, positions: np.ndarray) -> np.ndarray:
    array = np.asarray(positions)
    if array.dtype.kind not in "uif":
        raise InvalidInputError(f"{name}: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise InvalidInputError(f"{name}: expected shape (n, 2) in (y, x) order, got {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{name}: contains NaN or inf")
    return array


def _sign(sign: int) -> int:
    if sign not in (1, -1):
        raise InvalidInputError(f"sign: expected +1 or -1, got {sign!r}")
    return int(sign)


def positions_m_to_px(
    positions_m: np.ndarray,
    pixel_size_m: float | Sequence[float],
    origin_m: Sequence[float] | None = None,
    sign: int = 1,
    *,
    frame_size: int | None = None,
    margin_px: float = DEFAULT_MARGIN_PX,
) -> np.ndarray:
    """Positions in metres (lab frame) to probe centres in object pixels.

    The one place where origin, sign and pixel size meet::

        p_px = sign * (p_m - origin_m) / pixel_size_m

    so ``origin_m`` is the stage position (y, x) in metres of the centre of object pixel (0, 0).

    Parameters
    ----------
    positions_m : array_like
        (n, 2) positions (y, x) in metres.
    pixel_size_m : float or (float, float)
        Object pixel size in metres, or (dy, dx).
    origin_m : (float, float), optional
        Stage position (y, x) of object pixel (0, 0). Default: chosen so that the smallest
        position in each axis lands at ``frame_size / 2 + margin_px`` pixels, i.e. every probe
        patch (centre ``p`` samples ``p - N/2 + (0 .. N-1)``) starts ``margin_px`` pixels
        inside the object. Needs ``frame_size``.
    sign : {+1, -1}
        ``+1``: the stage coordinate is the probe position on the sample (CXI convention, ours).
        ``-1``: moving the stage by +d moves the beam by -d across the sample.
    frame_size : int, optional
        N, the probe / frame side; needed only when ``origin_m`` is None.
    margin_px : float
        Margin of the default origin.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 (y, x) object pixels.

    Examples
    --------
    >>> positions_m_to_px([[1e-6, 2e-6], [3e-6, 2e-6]], 1e-7, frame_size=16, margin_px=1)
    array([[ 9.,  9.],
           [29.,  9.]])
    >>> positions_m_to_px([[1e-6, -2e-6]], 1e-8, origin_m=(0.0, -3e-6))
    array([[100., 100.]])
    """
    pos = _positions("positions_m", positions_m)
    sizes = _pixel_pair(pixel_size_m)
    sign = _sign(sign)
    if origin_m is None:
        if frame_size is None:
            raise InvalidInputError("positions_m_to_px: pass origin_m or frame_size (the default "
                                    "origin puts the lowest position N/2 + margin inside)")
        if len(pos) == 0:
            raise InvalidInputError("positions_m: no positions to choose an origin from")
        inside = (_positive("frame_size", frame_size) / 2 + float(margin_px)) * sizes
        # sign=+1: the lowest stage value is the lowest pixel; sign=-1: the highest one is.
        extreme = pos.min(axis=0) if sign == 1 else pos.max(axis=0)
        origin = extreme - sign * inside
    else:
        origin = np.broadcast_to(np.asarray(origin_m, dtype=np.float64), (2,))
        if not np.isfinite(origin).all():
            raise InvalidInputError(f"origin_m: expected two finite numbers, got {origin_m!r}")
    return sign * (pos - origin) / sizes


def positions_px_to_m(
    positions_px: np.ndarray,
    pixel_size_m: float | Sequence[float],
    origin_m: Sequence[float] = (0.0, 0.0),
    sign: int = 1,
) -> np.ndarray:
    """Inverse of :func:`positions_m_to_px`: ``p_m = origin_m + sign * p_px * pixel_size_m``.

    Parameters
    ----------
    positions_px : array_like
        (n, 2) probe centres (y, x) in object pixels.
    pixel_size_m : float or (float, float)
        Object pixel size in metres, or (dy, dx).
    origin_m : (float, float)
        Stage position (y, x) of object pixel (0, 0).
    sign : {+1, -1}
        As in :func:`positions_m_to_px`.

    Returns
    -------
    numpy.ndarray
        (n, 2) float64 (y, x) metres.

    Examples
    --------
    >>> positions_px_to_m([[100.0, 100.0]], 1e-8, origin_m=(0.0, -3e-6))
    array([[ 1.e-06, -2.e-06]])
    """
    pos = _positions("positions_px", positions_px)
    origin = np.broadcast_to(np.asarray(origin_m, dtype=np.float64), (2,))
    return origin + _sign(sign) * pos * _pixel_pair(pixel_size_m)
