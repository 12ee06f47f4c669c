"""Helpers shared by the object generators: argument checks, base-map -> object maps, rasters.

Every generator builds a real "base map" first and turns it into a complex64 transmission
object at the very end, so the amplitude/phase conventions live here, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidInputError

SeedLike = int | np.random.Generator | None

PAPER_AMP_RANGE = (0.8, 1.2)  # amplitude = 1.2 - 0.4 b (BWN, SN, PR in the paper)
FULL_PHASE_RANGE = (-math.pi, math.pi)


def check_shape(shape: int | Sequence[int], *, minimum: int = 1) -> tuple[int, int]:
    """(H, W) of positive integers; an int means a square canvas."""
    if isinstance(shape, (int, np.integer)):
        dims = (shape, shape)
    else:
        try:
            dims = tuple(shape)
        except TypeError:
            dims = ()
    ok = len(dims) == 2 and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= minimum for d in dims
    )
    if not ok:
        raise InvalidInputError(
            f"shape: expected an int or (height, width) of integers >= {minimum}, got {shape!r}"
        )
    return int(dims[0]), int(dims[1])


def make_rng(seed: SeedLike) -> np.random.Generator:
    """A Generator from an int seed, an existing Generator (used as is) or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise InvalidInputError(
            f"seed: expected a non-negative int, a numpy Generator or None, got {seed!r}"
        )
    return np.random.default_rng(seed)


def check_range(
    name: str, value: Sequence[float], *, minimum: float = -math.inf
) -> tuple[float, float]:
    """A finite (low, high) pair with minimum <= low <= high."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected a (low, high) pair, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and minimum <= lo <= hi):
        bound = f" with low >= {minimum}" if math.isfinite(minimum) else ""
        raise InvalidInputError(
            f"{name}: expected finite (low, high) with low <= high{bound}, got {value!r}"
        )
    return lo, hi


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        relation = ">= 0" if allow_zero else "> 0"
        raise InvalidInputError(f"{name}: expected a finite number {relation}, got {value!r}")
    return v


def check_count(name: str, value: int, *, minimum: int = 0) -> int:
    """An integer >= minimum."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InvalidInputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def normalise01(x: np.ndarray) -> np.ndarray:
    """Min-max map to [0, 1]; a constant map becomes all zeros (nothing to scale)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def rescale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max map to [lo, hi]."""
    return lo + (hi - lo) * normalise01(x)


def base_map_to_object(
    b: np.ndarray, amp_range: tuple[float, float], phase_range: tuple[float, float]
) -> np.ndarray:
    """The paper's BWN/SN/PR map: amplitude falls and phase rises with b in [0, 1].

    amplitude = amp_hi - (amp_hi - amp_lo) b  (1.2 - 0.4 b for the default (0.8, 1.2)),
    phase = phase_lo + (phase_hi - phase_lo) b; amplitude and phase are fully correlated.
    """
    amp = amp_range[1] - (amp_range[1] - amp_range[0]) * b
    phase = phase_range[0] + (phase_range[1] - phase_range[0]) * b
    return to_complex(amp, phase)


def material_to_object(
    t: np.ndarray, amp_range: tuple[float, float], phase_range: tuple[float, float]
) -> np.ndarray:
    """Projected material t in [0, 1] -> object: more material absorbs more and retards more.

    amplitude = amp_hi - (amp_hi - amp_lo) t, phase = phase_hi - (phase_hi - phase_lo) t, as for
    a real X-ray sample (n = 1 - delta + i beta gives a negative phase shift); t = 0 is empty.
    """
    amp = amp_range[1] - (amp_range[1] - amp_range[0]) * t
    phase = phase_range[1] - (phase_range[1] - phase_range[0]) * t
    return to_complex(amp, phase)


def to_complex(amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """amp * exp(i phase) as complex64 (computed in float64, rounded once)."""
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def bbox(
    cy: float, cx: float, half: float, shape: tuple[int, int]
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Pixel window of a feature of half-size ``half`` centred at (cy, cx), clipped to the canvas.

    Returns the row and column slices and the (h, 1), (1, w) coordinates relative to the centre,
    or None when the window misses the canvas. Features are rasterised on their window only, so
    the cost of a feature is its area, not the canvas's.
    """
    y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)) + 1, shape[0])
    x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)) + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1, dtype=np.float64) - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float64) - cx)[None, :]
    return slice(y0, y1), slice(x0, x1), dy, dx


def inside_convex_polygon(dy: np.ndarray, dx: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Mask of the points (dy, dx) inside a convex polygon given by ordered (k, 2) (y, x) vertices.

    A point is inside when it lies on the same side of every edge (either winding works).
    """
    v0 = vertices
    v1 = np.roll(vertices, -1, axis=0)
    ey, ex = (v1 - v0).T
    cross = ex[:, None, None] * (dy[None] - v0[:, 0, None, None]) - ey[:, None, None] * (
        dx[None] - v0[:, 1, None, None]
    )
    return (cross >= 0).all(axis=0) | (cross <= 0).all(axis=0)


def inside_ellipse(dy: np.ndarray, dx: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    """Mask of the points inside an ellipse with semi-axes a (along ``angle``) and b."""
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def segment_distance(
    dy: np.ndarray, dx: np.ndarray, half_length: float, angle: float
) -> np.ndarray:
    """Distance of the points to a segment of half-length ``half_length`` centred at the origin."""
    c, s = math.cos(angle), math.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    excess = np.maximum(np.abs(u) - half_length, 0.0)
    return np.hypot(excess, v)
