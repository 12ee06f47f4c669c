"""Noise objects: blurred white noise (paper class BWN) and multi-octave gradient noise (SN)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import InvalidInputError
from ._common import (
    FULL_PHASE_RANGE,
    PAPER_AMP_RANGE,
    SeedLike,
    base_map_to_object,
    check_count,
    check_positive,
    check_range,
    check_shape,
    make_rng,
    normalise01,
)

__all__ = ["blurred_white_noise", "simplex_noise", "fractal_noise"]


def blurred_white_noise(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    sigma: float | None = None,
    sigma_range: tuple[float, float] = (1.0, 3.0),
    amp_range: tuple[float, float] = PAPER_AMP_RANGE,
    phase_range: tuple[float, float] = FULL_PHASE_RANGE,
) -> np.ndarray:
    """Uniform white noise blurred by a Gaussian (paper class BWN).

    The blur is periodic (the canvas wraps around), so the object has no edge artefact. The
    blurred map is min-max normalised to a base map b in [0, 1], then amplitude =
    amp_hi - (amp_hi - amp_lo) b and phase = phase_lo + (phase_hi - phase_lo) b
    (1.2 - 0.4 b and [-pi, pi] by default).

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    seed : int, numpy.random.Generator or None
        Random seed or Generator; None is not reproducible.
    sigma : float, optional
        Gaussian standard deviation in pixels; drawn from U(``sigma_range``) when None.
    sigma_range : (float, float)
        Range of the random sigma (the paper's U(1, 3) px).
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) ranges.

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = blurred_white_noise(64, seed=0, sigma=2.0)
    >>> obj.shape, round(float(abs(obj).max()), 3)
    ((64, 64), 1.2)
    """
    height, width = check_shape(shape)
    rng = make_rng(seed)
    amp_range = check_range("amp_range", amp_range, minimum=0.0)
    phase_range = check_range("phase_range", phase_range)
    if sigma is None:
        lo, hi = check_range("sigma_range", sigma_range, minimum=0.0)
        sigma = rng.uniform(lo, hi)
    sigma = check_positive("sigma", sigma)
    noise = rng.uniform(size=(height, width))
    b = normalise01(gaussian_filter(noise, sigma, mode="wrap"))
    return base_map_to_object(b, amp_range, phase_range)


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (C2-continuous between lattice cells)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(shape: tuple[int, int], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """One octave of 2-D gradient (Perlin) noise with lattice ``spacing`` px, about in [-1, 1].

    Random unit gradients sit on a lattice shifted by a random sub-cell offset (so octaves do
    not share lattice points); every pixel is evaluated at once from its four corners.
    """
    height, width = shape
    offset = rng.uniform(0.0, 1.0, 2)
    y = np.arange(height) / spacing + offset[0]
    x = np.arange(width) / spacing + offset[1]
    iy, ix = np.floor(y).astype(np.intp), np.floor(x).astype(np.intp)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    angles = rng.uniform(0.0, 2 * math.pi, (iy[-1] + 2, ix[-1] + 2))
    gy, gx = np.sin(angles), np.cos(angles)
    r0, r1 = iy[:, None], iy[:, None] + 1
    c0, c1 = ix[None, :], ix[None, :] + 1
    n00 = gy[r0, c0] * fy + gx[r0, c0] * fx
    n01 = gy[r0, c1] * fy + gx[r0, c1] * (fx - 1.0)
    n10 = gy[r1, c0] * (fy - 1.0) + gx[r1, c0] * fx
    n11 = gy[r1, c1] * (fy - 1.0) + gx[r1, c1] * (fx - 1.0)
    u, v = _fade(fx), _fade(fy)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return math.sqrt(2.0) * (top + v * (bottom - top))


def fractal_noise(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    octaves: int = 4,
    base_scale: float | None = None,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
) -> np.ndarray:
    """Multi-octave gradient noise, min-max normalised to [0, 1] (float64 base map).

    Octave k has lattice spacing ``base_scale / lacunarity**k`` pixels and weight
    ``persistence**k``. Octaves finer than 1 px would only alias and are skipped.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W).
    seed : int, numpy.random.Generator or None
        Random seed or Generator.
    octaves : int
        Number of octaves (>= 1).
    base_scale : float, optional
        Lattice spacing of the coarsest octave in pixels, >= 1 (default max(min(H, W) / 4, 1)).
    persistence : float
        Amplitude ratio between successive octaves.
    lacunarity : float
        Frequency ratio between successive octaves (> 1).

    Returns
    -------
    numpy.ndarray
        float64 (H, W) map in [0, 1].

    Examples
    --------
    >>> b = fractal_noise((32, 48), seed=0, octaves=3)
    >>> b.shape, float(b.min()), float(b.max())
    ((32, 48), 0.0, 1.0)
    """
    height, width = check_shape(shape)
    rng = make_rng(seed)
    octaves = check_count("octaves", octaves, minimum=1)
    base_scale = max(min(height, width) / 4, 1.0) if base_scale is None else base_scale
    base_scale = check_positive("base_scale", base_scale)
    if base_scale < 1.0:  # a finer lattice only aliases (and would need a huge gradient table)
        raise InvalidInputError(f"base_scale: expected >= 1 pixel, got {base_scale!r}")
    persistence = check_positive("persistence", persistence)
    lacunarity = check_positive("lacunarity", lacunarity)
    if lacunarity <= 1:
        raise InvalidInputError(f"lacunarity: expected > 1, got {lacunarity!r}")
    total = np.zeros((height, width))
    for k in range(octaves):
        spacing = base_scale / lacunarity**k
        if spacing < 1.0 and k > 0:
            break
        total += persistence**k * _gradient_noise((height, width), spacing, rng)
    return normalise01(total)


def simplex_noise(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    octaves: int | None = None,
    octave_range: tuple[int, int] = (3, 7),
    base_scale: float | None = None,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    amp_range: tuple[float, float] = PAPER_AMP_RANGE,
    phase_range: tuple[float, float] = FULL_PHASE_RANGE,
) -> np.ndarray:
    """Multi-octave coherent noise object (paper class SN, "simplex/Perlin noise").

    Gradient (Perlin) noise summed over octaves (see :func:`fractal_noise`) gives a base map b in
    [0, 1]; amplitude = amp_hi - (amp_hi - amp_lo) b and phase = phase_lo + (phase_hi - phase_lo) b.
    The whole grid is evaluated at once per octave: a 512 x 512 object takes tens of ms.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    seed : int, numpy.random.Generator or None
        Random seed or Generator; None is not reproducible.
    octaves : int, optional
        Number of octaves; drawn uniformly from ``octave_range`` (inclusive) when None.
    octave_range : (int, int)
        Range of the random number of octaves (the paper's 3 to 7).
    base_scale : float, optional
        Lattice spacing of the coarsest octave in pixels (default min(H, W) / 4).
    persistence, lacunarity : float
        Amplitude and frequency ratios between successive octaves.
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) ranges.

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = simplex_noise((64, 64), seed=3, octaves=5)
    >>> obj.dtype, round(float(abs(obj).min()), 3), round(float(abs(obj).max()), 3)
    (dtype('complex64'), 0.8, 1.2)
    """
    check_shape(shape)
    rng = make_rng(seed)
    amp_range = check_range("amp_range", amp_range, minimum=0.0)
    phase_range = check_range("phase_range", phase_range)
    if octaves is None:
        lo = check_count("octave_range[0]", octave_range[0], minimum=1)
        hi = check_count("octave_range[1]", octave_range[1], minimum=lo)
        octaves = int(rng.integers(lo, hi + 1))
    b = fractal_noise(
        shape,
        seed=rng,
        octaves=octaves,
        base_scale=base_scale,
        persistence=persistence,
        lacunarity=lacunarity,
    )
    return base_map_to_object(b, amp_range, phase_range)
