"""Scan patterns: where the probe goes.

All functions are unit-agnostic (metres or pixels, whatever ``extent`` and ``step`` are in) and
return (n, 2) float64 arrays of (y, x) centred on (0, 0).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "SCAN_PATTERNS",
    "raster_scan",
    "jittered_raster_scan",
    "fermat_spiral_scan",
    "concentric_circles_scan",
    "step_from_overlap",
    "scan_pattern",
]


def _extent(extent) -> tuple[float, float]:
    ext = np.broadcast_to(np.asarray(extent, dtype=float), (2,))
    if not (np.isfinite(ext).all() and (ext >= 0).all()):
        raise InvalidInputError(f"extent: expected non-negative (height, width), got {extent!r}")
    return float(ext[0]), float(ext[1])


def _check_step(step: float) -> float:
    if not (np.isfinite(step) and step > 0):
        raise InvalidInputError(f"step: expected a positive number, got {step!r}")
    return float(step)


#: Most points a scan pattern makes. Far above any real scan; what exceeds it is extent and step
#: in different units (pixels and metres), refused before it allocates gigabytes.
MAX_SCAN_POINTS = 10**7


def _check_count(n_points: float, extent, step: float) -> None:
    """Refuse a scan of more than :data:`MAX_SCAN_POINTS` points before making it."""
    if not n_points <= MAX_SCAN_POINTS:  # also catches an infinite count
        raise InvalidInputError(
            f"extent {tuple(float(v) for v in np.broadcast_to(extent, (2,)))} with step "
            f"{step!r} gives about {n_points:.3g} scan points (at most {MAX_SCAN_POINTS:.0e}); "
            "are extent and step in the same units (both metres or both pixels)?")


def step_from_overlap(probe_diameter: float, overlap: float) -> float:
    """Step giving a linear overlap ratio between neighbouring probes: d (1 - overlap).

    Examples
    --------
    >>> step_from_overlap(2.0, 0.75)
    0.5
    """
    if not 0 <= overlap < 1:
        raise InvalidInputError(f"overlap: expected a ratio in [0, 1), got {overlap!r}")
    if not probe_diameter > 0:
        raise InvalidInputError(f"probe_diameter: expected > 0, got {probe_diameter!r}")
    return probe_diameter * (1.0 - overlap)


def raster_scan(extent, step: float) -> np.ndarray:
    """Rectangular grid covering ``extent`` = (height, width), row by row (snake-free)."""
    height, width = _extent(extent)
    step = _check_step(step)
    _check_count((height / step + 1) * (width / step + 1), extent, step)
    ny = int(math.floor(height / step + 1e-9)) + 1
    nx = int(math.floor(width / step + 1e-9)) + 1
    ys = (np.arange(ny) - (ny - 1) / 2) * step
    xs = (np.arange(nx) - (nx - 1) / 2) * step
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def jittered_raster_scan(
    extent, step: float, *, jitter: float = 0.3, seed: int | np.random.Generator | None = None
) -> np.ndarray:
    """Raster grid with uniform random jitter of +-``jitter``/2 steps (the paper's training scans).

    Jitter breaks the grid's periodicity, which otherwise leaves raster-grid artefacts.

    Raises
    ------
    InvalidInputError
        A ``jitter`` that is not a finite number >= 0 (NaN would make every position NaN), or a
        bad extent / step.
    """
    if not (np.isfinite(jitter) and jitter >= 0):
        raise InvalidInputError(f"jitter: expected a finite fraction of a step >= 0, got "
                                f"{jitter!r}")
    rng = np.random.default_rng(seed)
    grid = raster_scan(extent, step)
    return grid + rng.uniform(-0.5, 0.5, size=grid.shape) * jitter * step


def fermat_spiral_scan(extent, step: float) -> np.ndarray:
    """Fermat spiral filling the ellipse inscribed in ``extent`` (uniform density, no grid).

    r_k = c sqrt(k), theta_k = k * golden angle, with c = step / sqrt(pi) so that each point
    covers an area step^2, as on a raster grid of the same step.
    """
    height, width = _extent(extent)
    step = _check_step(step)
    radius = max(height, width) / 2
    c = step / math.sqrt(math.pi)
    _check_count((radius / c) ** 2 + 1, extent, step)
    n = int(math.floor((radius / c) ** 2)) + 1
    k = np.arange(n)
    r = c * np.sqrt(k)
    theta = k * math.pi * (3 - math.sqrt(5))
    y, x = r * np.sin(theta), r * np.cos(theta)
    # Squeeze the circle into the requested ellipse.
    if radius > 0:
        y = y * (height / 2) / radius
        x = x * (width / 2) / radius
    return np.stack([y, x], axis=1)


def concentric_circles_scan(extent, step: float, *, n_first: int = 6) -> np.ndarray:
    """Concentric rings ``step`` apart with points ``step`` apart along each ring."""
    height, width = _extent(extent)
    step = _check_step(step)
    radius = max(height, width) / 2
    points = [np.zeros((1, 2))]
    rings = radius / step
    # Ring k holds max(n_first k, 2 pi k) points (rounded): about that times R (R + 1) / 2.
    _check_count(1 + max(n_first, 2 * math.pi) * rings * (rings + 1) / 2, extent, step)
    n_rings = int(math.floor(rings + 1e-9))
    for ring in range(1, n_rings + 1):
        r = ring * step
        n = max(n_first * ring, int(round(2 * math.pi * r / step)))
        theta = 2 * math.pi * np.arange(n) / n
        points.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
    pts = np.concatenate(points)
    if radius > 0:
        pts = pts * np.array([height / 2 / radius, width / 2 / radius])
    return pts


SCAN_PATTERNS = ("raster", "jittered_raster", "fermat", "concentric")


def scan_pattern(
    pattern: str,
    extent,
    *,
    step: float | None = None,
    overlap: float | None = None,
    probe_diameter: float | None = None,
    seed: int | None = None,
    jitter: float = 0.3,
) -> np.ndarray:
    """Build a named scan pattern from a step or from an overlap ratio.

    Parameters
    ----------
    pattern : {"raster", "jittered_raster", "fermat", "concentric"}
        Which pattern.
    extent : float or (float, float)
        Scanned (height, width), same unit as ``step``.
    step : float, optional
        Distance between neighbouring points. Give either ``step`` or ``overlap`` +
        ``probe_diameter``.
    overlap, probe_diameter : float, optional
        Linear overlap ratio in [0, 1) and probe diameter: step = diameter (1 - overlap).
    seed : int, optional
        Random seed (jittered raster only).
    jitter : float
        Jitter amplitude in steps (jittered raster only).

    Returns
    -------
    numpy.ndarray
        (n, 2) (y, x) positions centred on 0.

    Examples
    --------
    >>> scan_pattern("raster", (1.0, 2.0), step=1.0).tolist()
    [[-0.5, -1.0], [-0.5, 0.0], [-0.5, 1.0], [0.5, -1.0], [0.5, 0.0], [0.5, 1.0]]
    """
    if (step is None) == (overlap is None):
        raise InvalidInputError("give exactly one of step= or overlap= (with probe_diameter=)")
    if step is None:
        if probe_diameter is None:
            raise InvalidInputError("overlap= needs probe_diameter=")
        step = step_from_overlap(probe_diameter, overlap)
    if pattern == "raster":
        return raster_scan(extent, step)
    if pattern == "jittered_raster":
        return jittered_raster_scan(extent, step, jitter=jitter, seed=seed)
    if pattern == "fermat":
        return fermat_spiral_scan(extent, step)
    if pattern == "concentric":
        return concentric_circles_scan(extent, step)
    raise InvalidInputError(f"pattern: unknown {pattern!r}; expected one of {SCAN_PATTERNS}")
