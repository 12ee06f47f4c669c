"""Procedural objects: layered disks, Gaussian blobs, ellipses and lines plus noise (paper PR)."""

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
    bbox,
    check_count,
    check_range,
    check_shape,
    inside_ellipse,
    make_rng,
    normalise01,
    segment_distance,
)
from ._noise import fractal_noise

__all__ = ["procedural", "procedural_base_map", "PROCEDURAL_LAYERS"]

PROCEDURAL_LAYERS = ("disks", "blobs", "ellipses", "lines")


def _layer(
    kind: str,
    shape: tuple[int, int],
    n_items: int,
    size_px: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """One layer of ``n_items`` features of one kind, values in [0.2, 1] on a zero background.

    Disks, ellipses and lines are painted over one another; Gaussian blobs add up.
    """
    canvas = np.zeros(shape)
    for _ in range(n_items):
        cy, cx = rng.uniform(size=2) * np.array(shape)
        r = rng.uniform(*size_px)
        angle = rng.uniform(0, math.pi)
        value = rng.uniform(0.2, 1.0)
        if kind == "blobs":
            window = bbox(cy, cx, 2.0 * r, shape)  # sigma = r / 2: the window holds 4 sigma
            if window is not None:
                rows, cols, dy, dx = window
                canvas[rows, cols] += value * np.exp(-2.0 * (dy**2 + dx**2) / (r * r))
            continue
        if kind == "lines":
            half_length, width = 2.5 * r, rng.uniform(1.0, 4.0)
            window = bbox(cy, cx, half_length + width, shape)
        else:
            window = bbox(cy, cx, r, shape)
        if window is None:
            continue
        rows, cols, dy, dx = window
        if kind == "disks":
            mask = dy**2 + dx**2 <= r * r
        elif kind == "ellipses":
            mask = inside_ellipse(dy, dx, r, r * rng.uniform(0.25, 0.9), angle)
        else:
            mask = segment_distance(dy, dx, half_length, angle) <= width / 2
        canvas[rows, cols][mask] = value
    return canvas


def procedural_base_map(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    layers: Sequence[str] = PROCEDURAL_LAYERS,
    n_per_layer: tuple[int, int] = (5, 20),
    size_range: tuple[float, float] = (0.02, 0.12),
    blur_range: tuple[float, float] = (0.0, 2.0),
    noise_weight: float | None = None,
    noise_weight_range: tuple[float, float] = (0.3, 0.4),
    noise_octaves: int = 4,
) -> np.ndarray:
    """The [0, 1] base map of :func:`procedural` (float64 (H, W)); same parameters."""
    height, width = check_shape(shape)
    rng = make_rng(seed)
    layers = tuple(layers)
    unknown = sorted(set(layers) - set(PROCEDURAL_LAYERS))
    if unknown:
        raise InvalidInputError(
            f"layers: expected kinds from {PROCEDURAL_LAYERS}, got unknown {unknown}"
        )
    n_lo = check_count("n_per_layer[0]", n_per_layer[0])
    n_hi = check_count("n_per_layer[1]", n_per_layer[1], minimum=n_lo)
    size_lo, size_hi = check_range("size_range", size_range, minimum=0.0)
    if size_lo <= 0:
        raise InvalidInputError(f"size_range: expected low > 0, got {size_range!r}")
    blur_lo, blur_hi = check_range("blur_range", blur_range, minimum=0.0)
    if noise_weight is None:
        noise_weight = rng.uniform(*check_range("noise_weight_range", noise_weight_range))
    if not 0.0 <= noise_weight <= 1.0:
        raise InvalidInputError(f"noise_weight: expected a weight in [0, 1], got {noise_weight!r}")

    scale = min(height, width)
    size_px = (size_lo * scale, size_hi * scale)
    features = np.zeros((height, width))
    for kind in layers:
        n_items = int(rng.integers(n_lo, n_hi + 1))
        layer = _layer(kind, (height, width), n_items, size_px, rng)
        sigma = rng.uniform(blur_lo, blur_hi)
        if sigma > 0:  # per-layer blur: each layer has its own edge sharpness
            layer = gaussian_filter(layer, sigma, mode="nearest")
        features += rng.uniform(0.5, 1.0) * layer
    noise = fractal_noise((height, width), seed=rng, octaves=noise_octaves)
    return normalise01((1.0 - noise_weight) * normalise01(features) + noise_weight * noise)


def procedural(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    layers: Sequence[str] = PROCEDURAL_LAYERS,
    n_per_layer: tuple[int, int] = (5, 20),
    size_range: tuple[float, float] = (0.02, 0.12),
    blur_range: tuple[float, float] = (0.0, 2.0),
    noise_weight: float | None = None,
    noise_weight_range: tuple[float, float] = (0.3, 0.4),
    noise_octaves: int = 4,
    amp_range: tuple[float, float] = PAPER_AMP_RANGE,
    phase_range: tuple[float, float] = FULL_PHASE_RANGE,
) -> np.ndarray:
    """Procedural object: layered disks, blobs, ellipses and lines plus gradient noise (PR).

    Each layer holds a random number of features of one kind (sizes from ``size_range`` times
    min(H, W), values in [0.2, 1]) and gets its own Gaussian blur drawn from ``blur_range``; the
    layers are summed with random weights in [0.5, 1], normalised, and mixed with 4-octave gradient
    noise at weight w ~ U(``noise_weight_range``): b = (1 - w) features + w noise, renormalised to
    [0, 1]. Then amplitude = amp_hi - (amp_hi - amp_lo) b and phase = phase_lo + (phase_hi -
    phase_lo) b.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    seed : int, numpy.random.Generator or None
        Random seed or Generator; None is not reproducible.
    layers : sequence of str
        Layer kinds, bottom to top, from :data:`PROCEDURAL_LAYERS` (repeats allowed).
    n_per_layer : (int, int)
        Inclusive range of the number of features per layer.
    size_range : (float, float)
        Feature size (disk radius, blob 2-sigma radius, ellipse semi-major axis, 0.4 x line
        length) as fractions of min(H, W).
    blur_range : (float, float)
        Range of the per-layer Gaussian blur sigma in pixels.
    noise_weight : float, optional
        Weight of the noise; drawn from ``noise_weight_range`` when None (paper: 0.3 to 0.4).
    noise_weight_range : (float, float)
        Range of the random noise weight.
    noise_octaves : int
        Octaves of the gradient noise.
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) ranges.

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = procedural((96, 96), seed=2)
    >>> obj.dtype, obj.shape
    (dtype('complex64'), (96, 96))
    """
    amp_range = check_range("amp_range", amp_range, minimum=0.0)
    phase_range = check_range("phase_range", phase_range)
    b = procedural_base_map(
        shape,
        seed=seed,
        layers=layers,
        n_per_layer=n_per_layer,
        size_range=size_range,
        blur_range=blur_range,
        noise_weight=noise_weight,
        noise_weight_range=noise_weight_range,
        noise_octaves=noise_octaves,
    )
    return base_map_to_object(b, amp_range, phase_range)
