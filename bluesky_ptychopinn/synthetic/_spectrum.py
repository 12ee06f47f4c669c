"""Radially averaged power spectra: how object classes differ (the paper's Fig. 4 study)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

__all__ = ["radial_power_spectrum", "spectral_slope"]


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise InvalidInputError(f"image: expected a 2-D array of at least 8 x 8, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise InvalidInputError("image: expected finite numeric values")
    return arr


def radial_power_spectrum(
    image: np.ndarray, *, window: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectral density of a 2-D image.

    The mean is removed and, with ``window``, a separable Hann window applied first so that the
    jump between opposite edges of a non-periodic image does not leak a spurious f^-2 tail into
    every spectrum. Power is |FFT|^2 / sum(window^2) (Parseval-normalised), averaged over rings of
    width 1 / min(H, W) cycles/pixel, from the first ring up to Nyquist (0.5); DC is left out.
    Complex images (objects) are accepted as they are; pass ``np.angle(obj)`` or ``abs(obj)`` to
    study one component.

    Parameters
    ----------
    image : numpy.ndarray
        Real or complex (H, W) array.
    window : bool
        Apply a Hann window before the FFT.

    Returns
    -------
    freq : numpy.ndarray
        Ring centres in cycles/pixel: k / min(H, W) for k = 1 .. min(H, W) // 2.
    power : numpy.ndarray
        Mean power in each ring.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> freq, power = radial_power_spectrum(rng.normal(size=(64, 64)), window=False)
    >>> float(freq[0]), float(freq[-1]), bool(0.7 < power.mean() < 1.3)  # white: unit power
    (0.015625, 0.5, True)
    """
    arr = _check_image(image)
    height, width = arr.shape
    data = arr - arr.mean()
    weight = np.ones((height, width))
    if window:
        weight = np.outer(np.hanning(height), np.hanning(width))
    spectrum = np.abs(np.fft.fft2(data * weight)) ** 2 / np.sum(weight**2)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    size = min(height, width)
    ring = np.rint(np.hypot(fy, fx) * size).astype(np.intp).ravel()
    n_rings = size // 2
    keep = (ring >= 1) & (ring <= n_rings)
    total = np.bincount(ring[keep], weights=spectrum.ravel()[keep], minlength=n_rings + 1)
    count = np.bincount(ring[keep], minlength=n_rings + 1)
    k = np.arange(1, n_rings + 1)
    return k / size, total[1:] / count[1:]


def spectral_slope(
    image: np.ndarray, *, fmin: float = 0.02, fmax: float = 0.25, window: bool = True
) -> float:
    """Least-squares slope of log10(power) against log10(frequency) over [fmin, fmax].

    A power law P ~ f^s has slope s: about -2 for an image of sharp-edged patches of all sizes
    (dead leaves), 0 for white noise, very negative for smooth (blurred) images.

    Parameters
    ----------
    image : numpy.ndarray
        Real or complex (H, W) array.
    fmin, fmax : float
        Frequency band in cycles/pixel, 0 < fmin < fmax <= 0.5.
    window : bool
        Hann-window the image first (see :func:`radial_power_spectrum`).

    Returns
    -------
    float
        The slope.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> abs(spectral_slope(rng.normal(size=(128, 128)))) < 0.3  # white noise: flat
    True
    """
    if not (0 < fmin < fmax <= 0.5):
        raise InvalidInputError(
            f"(fmin, fmax): expected 0 < fmin < fmax <= 0.5 cycles/pixel, got ({fmin}, {fmax})"
        )
    freq, power = radial_power_spectrum(image, window=window)
    band = (freq >= fmin) & (freq <= fmax) & (power > 0)
    if band.sum() < 3:
        raise InvalidInputError(
            f"(fmin, fmax) = ({fmin}, {fmax}): fewer than 3 frequency rings with power in the "
            f"band for a {np.shape(image)} image"
        )
    slope, _ = np.polyfit(np.log10(freq[band]), np.log10(power[band]), 1)
    return float(slope)
