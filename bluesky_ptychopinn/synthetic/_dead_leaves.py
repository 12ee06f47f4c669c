"""Dead-leaves objects: occluding random shapes with power-law sizes (the paper's DL class)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError
from ._common import (
    FULL_PHASE_RANGE,
    SeedLike,
    bbox,
    check_count,
    check_positive,
    check_range,
    check_shape,
    inside_convex_polygon,
    make_rng,
    rescale,
    to_complex,
)

__all__ = ["dead_leaves", "DEAD_LEAF_SHAPES"]

DEAD_LEAF_SHAPES = ("circle", "square", "rectangle", "triangle", "quadrilateral")


def power_law_radii(
    rng: np.random.Generator, n: int, rmin: float, rmax: float, power: float
) -> np.ndarray:
    """n radii with density proportional to r^-power on [rmin, rmax] (inverse-CDF sampling)."""
    u = rng.uniform(size=n)
    if rmin == rmax:
        return np.full(n, rmin)
    if math.isclose(power, 1.0):
        return rmin * (rmax / rmin) ** u
    e = 1.0 - power
    return (rmin**e + u * (rmax**e - rmin**e)) ** (1.0 / e)


def _polygon(kind: str, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """(k, 2) (y, x) vertices, in angular order, of a convex polygon of circumradius ``radius``.

    Jittered regular vertices keep triangles and quadrilaterals convex and free of slivers.
    """
    if kind == "square":
        theta = angle + np.arange(4) * (math.pi / 2)
    elif kind == "rectangle":  # axis-aligned, aspect ratio tan(a) between ~0.2 and ~5
        a = rng.uniform(0.2, math.pi / 2 - 0.2)
        theta = np.array([a, math.pi - a, math.pi + a, 2 * math.pi - a])
    elif kind == "triangle":
        theta = angle + np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.4, 0.4, 3)
    else:  # quadrilateral
        theta = angle + np.arange(4) * (math.pi / 2) + rng.uniform(-0.35, 0.35, 4)
    return radius * np.stack([np.sin(theta), np.cos(theta)], axis=1)


def _paint_labels(
    shape: tuple[int, int],
    centres: np.ndarray,
    radii_px: np.ndarray,
    kinds: Sequence[str],
    rng: np.random.Generator,
) -> np.ndarray:
    """Index of the topmost shape at each pixel (-1 where none): later shapes occlude earlier."""
    labels = np.full(shape, -1, dtype=np.int32)
    angles = rng.uniform(0, 2 * math.pi, len(kinds))
    for i, (kind, (cy, cx), r) in enumerate(zip(kinds, centres, radii_px, strict=True)):
        window = bbox(cy, cx, r, shape)
        if window is None:
            continue
        rows, cols, dy, dx = window
        if kind == "circle":
            mask = dy**2 + dx**2 <= r * r
        else:
            mask = inside_convex_polygon(dy, dx, _polygon(kind, r, angles[i], rng))
        labels[rows, cols][mask] = i
    return labels


def dead_leaves(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = None,
    n_shapes: int = 500,
    rmin: float = 0.03,
    rmax: float = 0.2,
    power: float = 3.0,
    shapes: Sequence[str] = DEAD_LEAF_SHAPES,
    beta_scale: float = 1e-3,
    delta_ratio: tuple[float, float] = (100.0, 10.0),
    thickness: float = 3.0,
    amp_range: tuple[float, float] = (0.6, 1.1),
    phase_range: tuple[float, float] = FULL_PHASE_RANGE,
) -> np.ndarray:
    """Dead-leaves transmission object: occluding shapes with power-law sizes (paper class DL).

    ``n_shapes`` shapes (drawn uniformly from ``shapes``) are dropped one over another at uniform
    random centres; their circumradii follow a density proportional to r^-power between ``rmin``
    and ``rmax`` times the canvas's shorter side. Shape i gets an absorption index
    beta_i = U^1.5 * beta_scale and a refractive decrement delta_i = beta_i * N(mean, std) with
    (mean, std) = ``delta_ratio``; amplitude = exp(-thickness beta) and phase =
    -thickness delta (empty canvas: beta = delta = 0). Amplitude and phase are finally min-max
    rescaled to ``amp_range`` and ``phase_range``.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    seed : int, numpy.random.Generator or None
        Random seed (same seed, same object) or a Generator to draw from; None is not
        reproducible.
    n_shapes : int
        Number of shapes.
    rmin, rmax : float
        Smallest and largest circumradius as fractions of min(H, W).
    power : float
        Exponent p of the size density r^-p (p = 3 makes the image close to scale invariant).
    shapes : sequence of str
        Shape kinds to draw from: any of :data:`DEAD_LEAF_SHAPES`.
    beta_scale : float
        Largest absorption index.
    delta_ratio : (float, float)
        Mean and standard deviation of delta / beta.
    thickness : float
        Optical thickness factor k t in amplitude = exp(-k t beta), phase = -k t delta.
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) ranges after rescaling.

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = dead_leaves((128, 128), seed=1)
    >>> obj.dtype, obj.shape
    (dtype('complex64'), (128, 128))
    >>> bool(abs(obj).min() >= 0.6 - 1e-6 and abs(obj).max() <= 1.1 + 1e-6)
    True
    """
    height, width = check_shape(shape)
    rng = make_rng(seed)
    n_shapes = check_count("n_shapes", n_shapes)
    rmin, rmax = check_range("(rmin, rmax)", (rmin, rmax), minimum=0.0)
    if rmin <= 0:
        raise InvalidInputError(f"rmin: expected > 0, got {rmin!r}")
    power = check_positive("power", power, allow_zero=True)
    kinds_allowed = tuple(shapes)
    unknown = sorted(set(kinds_allowed) - set(DEAD_LEAF_SHAPES))
    if not kinds_allowed or unknown:
        raise InvalidInputError(
            f"shapes: expected a non-empty subset of {DEAD_LEAF_SHAPES}, got {shapes!r}"
        )
    beta_scale = check_positive("beta_scale", beta_scale)
    ratio_mean, ratio_std = float(delta_ratio[0]), float(delta_ratio[1])
    if not (math.isfinite(ratio_mean) and math.isfinite(ratio_std) and ratio_std >= 0):
        raise InvalidInputError(
            f"delta_ratio: expected (mean, std >= 0), finite, got {delta_ratio!r}"
        )
    thickness = check_positive("thickness", thickness)
    amp_range = check_range("amp_range", amp_range, minimum=0.0)
    phase_range = check_range("phase_range", phase_range)

    radii = power_law_radii(rng, n_shapes, rmin, rmax, power) * min(height, width)
    centres = rng.uniform(size=(n_shapes, 2)) * np.array([height, width])
    kinds = [kinds_allowed[k] for k in rng.integers(0, len(kinds_allowed), n_shapes)]
    beta = rng.uniform(size=n_shapes) ** 1.5 * beta_scale
    delta = beta * rng.normal(ratio_mean, ratio_std, size=n_shapes)
    labels = _paint_labels((height, width), centres, radii, kinds, rng)

    # Label -1 (no shape) picks the appended 0: the empty canvas has beta = delta = 0.
    beta_map = np.append(beta, 0.0)[labels]
    delta_map = np.append(delta, 0.0)[labels]
    amp = rescale(np.exp(-thickness * beta_map), *amp_range)
    phase = rescale(-thickness * delta_map, *phase_range)
    return to_complex(amp, phase)
