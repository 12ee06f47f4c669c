"""Built-in test samples for the simulated beamline: star, chip, cells, one-quadrant features.

Samples describe projected material t in [0, 1] (0 = empty) turned into an object by
amplitude = amp_hi - (amp_hi - amp_lo) t and phase = phase_hi - (phase_hi - phase_lo) t, so empty
regions are exactly (amp_hi, phase_hi) and contrast is modest by default (amplitude 0.8 to 1,
phase -0.5 to 0 rad), like a thin real sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import InvalidInputError
from ._common import (
    SeedLike,
    bbox,
    check_count,
    check_positive,
    check_range,
    check_shape,
    make_rng,
    material_to_object,
)
from ._procedural import procedural_base_map

__all__ = ["siemens_star", "test_chip", "cells", "quadrant_features", "QUADRANTS"]

SAMPLE_AMP_RANGE = (0.8, 1.0)
SAMPLE_PHASE_RANGE = (-0.5, 0.0)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def _ranges(amp_range, phase_range) -> tuple[tuple[float, float], tuple[float, float]]:
    return check_range("amp_range", amp_range, minimum=0.0), check_range("phase_range", phase_range)


def _siemens_material(shape: tuple[int, int], n_spokes: int, radius: float) -> np.ndarray:
    """Anti-aliased star: coverage from the signed distance (px) to the nearest spoke edge.

    Near the centre, where a spoke period gets below 2 px, the pattern fades to grey (t = 0.5)
    instead of aliasing.
    """
    height, width = shape
    y = np.arange(height)[:, None] - (height - 1) / 2
    x = np.arange(width)[None, :] - (width - 1) / 2
    r = np.hypot(y, x)
    phi = np.mod(n_spokes * np.arctan2(y, x), 2 * math.pi)
    inside = np.minimum(phi, math.pi - phi)  # angular distance to the edges, within a spoke
    outside = np.minimum(phi - math.pi, 2 * math.pi - phi)  # ... and within a gap
    arc = np.where(phi < math.pi, inside, -outside)
    t = np.clip(0.5 + r * arc / n_spokes, 0.0, 1.0)
    resolved = np.clip((2 * math.pi * r / n_spokes - 2.0) / 2.0, 0.0, 1.0)
    t = 0.5 + (t - 0.5) * resolved
    return t * np.clip(radius - r + 0.5, 0.0, 1.0)


def siemens_star(
    shape: int | Sequence[int],
    n_spokes: int = 36,
    *,
    radius: float = 0.45,
    amp_range: tuple[float, float] = SAMPLE_AMP_RANGE,
    phase_range: tuple[float, float] = SAMPLE_PHASE_RANGE,
) -> np.ndarray:
    """Siemens star resolution target: ``n_spokes`` material spokes around the canvas centre.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    n_spokes : int
        Number of material spokes (as many gaps between them).
    radius : float
        Star radius as a fraction of min(H, W).
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) of empty (high end) and full material (low end).

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> star = siemens_star(128, n_spokes=16)
    >>> round(float(abs(star[0, 0])), 3), round(float(abs(star).min()), 3)
    (1.0, 0.8)
    """
    height, width = check_shape(shape, minimum=8)
    n_spokes = check_count("n_spokes", n_spokes, minimum=2)
    radius = check_positive("radius", radius)
    t = _siemens_material((height, width), n_spokes, radius * min(height, width))
    return material_to_object(t, *_ranges(amp_range, phase_range))


def _chip_material(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Two metal layers of Manhattan wires (0.55 and 0.8), square pads (1.0) and a grating block."""
    height, width = shape
    size = min(height, width)
    margin = max(2, round(0.06 * size))
    t = np.zeros(shape)
    widths = np.array([2, 3, 4, 6]) * max(1, size // 256)
    pad = max(4, size // 20)
    n_wires = max(3, size // 24)
    ends = []
    for axis, level in ((0, 0.55), (1, 0.8)):  # axis 0: horizontal wires, axis 1: vertical
        along, across = (width, height) if axis == 0 else (height, width)
        for _ in range(n_wires):
            w = int(rng.choice(widths))
            c = int(rng.integers(margin, across - margin - w))
            a0, a1 = np.sort(rng.integers(margin, along - margin, 2))
            a1 = max(a1, min(a0 + along // 5, along - margin))
            if axis == 0:
                t[c : c + w, a0:a1] = np.maximum(t[c : c + w, a0:a1], level)
                ends += [(c + w // 2, a0), (c + w // 2, a1)]
            else:
                t[a0:a1, c : c + w] = np.maximum(t[a0:a1, c : c + w], level)
                ends += [(a0, c + w // 2), (a1, c + w // 2)]
    for k in rng.choice(len(ends), size=len(ends) // 2, replace=False):
        y, x = ends[k]
        t[max(y - pad // 2, 0) : y + pad // 2, max(x - pad // 2, 0) : x + pad // 2] = 1.0
    # Line-space grating block (periods 2, 4 and 8 px) in the bottom-right corner.
    block = max(12, size // 5)
    y0, x0 = height - margin - block, width - margin - block
    t[y0 - 2 : y0 + block + 2, x0 - 2 : x0 + block + 2] = 0.0  # keep the block clear of wires
    for i, period in enumerate((2, 4, 8)):
        rows = slice(y0 + i * block // 3, y0 + (i + 1) * block // 3 - 1)
        cols = np.arange(x0, x0 + block)
        t[rows, cols[(cols - x0) % period < period // 2]] = 1.0
    return t


def test_chip(
    shape: int | Sequence[int],
    *,
    seed: SeedLike = 0,
    amp_range: tuple[float, float] = SAMPLE_AMP_RANGE,
    phase_range: tuple[float, float] = SAMPLE_PHASE_RANGE,
) -> np.ndarray:
    """Integrated-circuit-like sample: Manhattan wires on two levels, pads and a grating block.

    Horizontal wires (material 0.55) and vertical wires (0.8) of 2 to 6 px width, square pads
    (1.0) on half of the wire ends and a line-space grating block with 2, 4 and 8 px periods in
    the bottom-right corner; edges are pixel-sharp.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W), at least 32 x 32; an int gives a square.
    seed : int, numpy.random.Generator or None
        Layout seed (default 0: the same chip every time).
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) of empty (high end) and full material (low end).

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> chip = test_chip(128)
    >>> chip.dtype, round(float(abs(chip).min()), 3)
    (dtype('complex64'), 0.8)
    """
    height, width = check_shape(shape, minimum=32)
    t = _chip_material((height, width), make_rng(seed))
    return material_to_object(t, *_ranges(amp_range, phase_range))


test_chip.__test__ = False  # a sample generator, not a pytest test function


def _cells_material(shape: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Blobby cells (material 0.3 to 0.5) with a denser nucleus, mostly non-overlapping."""
    height, width = shape
    size = min(height, width)
    t = np.zeros(shape)
    placed: list[tuple[float, float, float]] = []
    for _ in range(50 * n):  # rejection sampling: outlines reach 1.36 r0, so cells rarely touch
        if len(placed) == n:
            break
        r0 = rng.uniform(0.04, 0.09) * size
        cy, cx = rng.uniform(r0, height - r0), rng.uniform(r0, width - r0)
        if any(math.hypot(cy - py, cx - px) < 1.3 * (r0 + pr) for py, px, pr in placed):
            continue
        placed.append((cy, cx, r0))
        rows, cols, dy, dx = bbox(cy, cx, 1.4 * r0, shape)  # the outline stays within 1.36 r0
        theta = np.arctan2(dy, dx)
        wobble = sum(
            rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
            for k in (2, 3, 4)
        )
        body = np.hypot(dy, dx) <= r0 * (1.0 + wobble)
        ny, nx = rng.uniform(-0.25, 0.25, 2) * r0
        nucleus = np.hypot(dy - ny, dx - nx) <= 0.35 * r0
        cell = rng.uniform(0.3, 0.5) * body + 0.35 * nucleus
        t[rows, cols] = np.maximum(t[rows, cols], cell)
    return np.clip(gaussian_filter(t, 1.0), 0.0, 1.0)


def cells(
    shape: int | Sequence[int],
    n: int = 20,
    *,
    seed: SeedLike = 0,
    amp_range: tuple[float, float] = SAMPLE_AMP_RANGE,
    phase_range: tuple[float, float] = SAMPLE_PHASE_RANGE,
) -> np.ndarray:
    """Biological-cell-like particles: ``n`` blobby bodies with a denser nucleus each.

    Cell radii are 4 to 9 % of min(H, W) with a wavy outline (harmonics 2 to 4); bodies have
    material 0.3 to 0.5, nuclei 0.35 more; the map is blurred by 1 px. Fewer than ``n`` cells are
    placed when the canvas is too crowded.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W); an int gives a square.
    n : int
        Number of cells.
    seed : int, numpy.random.Generator or None
        Layout seed (default 0: the same sample every time).
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) of empty (high end) and full material (low end).

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = cells(128, n=10)
    >>> obj.shape, bool(abs(obj).max() <= 1.0 + 1e-6)
    ((128, 128), True)
    """
    height, width = check_shape(shape, minimum=16)
    n = check_count("n", n)
    t = _cells_material((height, width), n, make_rng(seed))
    return material_to_object(t, *_ranges(amp_range, phase_range))


def quadrant_features(
    shape: int | Sequence[int],
    quadrant: str = "top-left",
    *,
    seed: SeedLike = 0,
    amp_range: tuple[float, float] = SAMPLE_AMP_RANGE,
    phase_range: tuple[float, float] = SAMPLE_PHASE_RANGE,
) -> np.ndarray:
    """Structure in one quadrant only, empty (flat) elsewhere.

    The chosen quadrant holds a procedural texture (see :func:`procedural`) tapered to zero at the
    quadrant's border with a raised cosine, so the other three quadrants are exactly flat. Useful
    to check orientation (does structure come back in the right place?) and adaptive scanning.
    Top means low row indices, left low column indices.

    Parameters
    ----------
    shape : int or (int, int)
        Canvas (H, W), at least 16 x 16; an int gives a square.
    quadrant : {"top-left", "top-right", "bottom-left", "bottom-right"}
        Where the structure is.
    seed : int, numpy.random.Generator or None
        Texture seed (default 0).
    amp_range, phase_range : (float, float)
        Amplitude and phase (radians) of empty (high end) and full material (low end).

    Returns
    -------
    numpy.ndarray
        complex64 (H, W) object.

    Examples
    --------
    >>> obj = quadrant_features(64, "bottom-right")
    >>> float(np.ptp(abs(obj[:32, :]))), bool(np.ptp(abs(obj[32:, 32:])) > 0.05)
    (0.0, True)
    """
    height, width = check_shape(shape, minimum=16)
    if quadrant not in QUADRANTS:
        raise InvalidInputError(f"quadrant: expected one of {QUADRANTS}, got {quadrant!r}")
    qh, qw = height // 2, width // 2
    texture = procedural_base_map((qh, qw), seed=make_rng(seed))
    taper = np.outer(_raised_cosine(qh), _raised_cosine(qw))
    t = np.zeros((height, width))
    rows = slice(0, qh) if quadrant.startswith("top") else slice(height - qh, height)
    cols = slice(0, qw) if quadrant.endswith("left") else slice(width - qw, width)
    t[rows, cols] = texture * taper
    return material_to_object(t, *_ranges(amp_range, phase_range))


def _raised_cosine(n: int, fraction: float = 0.15) -> np.ndarray:
    """1-D window: 0 at both ends, 1 in the middle, cosine ramps over ``fraction`` of n each."""
    ramp = max(2, int(round(fraction * n)))
    w = np.ones(n)
    edge = 0.5 - 0.5 * np.cos(math.pi * np.arange(ramp) / ramp)
    w[:ramp] = edge
    w[n - ramp :] = edge[::-1]
    return w
