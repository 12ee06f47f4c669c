"""Recommenders: where to scan next, given the live reconstruction.

All share one interface, :class:`Recommender`: ``suggest(view, n, visited_m)`` returns up to
``n`` new stage positions (metres) plus a small dict explaining the choice, which the plan
records in its ``feedback`` stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from ..errors import InvalidInputError

__all__ = [
    "ReconstructionView",
    "Recommender",
    "FeatureRecommender",
    "UncertaintyRecommender",
    "deviation_rms",
    "seen_mask",
    "OptimizerRecommender",
    "make_recommender",
]


@dataclass
class ReconstructionView:
    """A snapshot plus the geometry to turn canvas pixels into stage metres.

    Canvas pixel (i, j) is object pixel (i, j) + ``origin_px``; object pixel p is at stage
    position ``sign * p * pixel_size_m`` (the live callback's convention, origin at stage 0).
    ``object`` is the best current estimate (``estimate``: ``"network"``, the stitched
    network object, or ``"refined"``, the refiner's object placed on the network's canvas when
    it explains the frames better); ``weight`` and ``uncertainty`` are the network's.
    ``frames``: how many of the scan's frames (the first, in acquisition order) the estimate
    holds (``None``: all measured so far).
    """

    object: np.ndarray
    weight: np.ndarray
    uncertainty: np.ndarray
    origin_px: tuple[float, float]
    pixel_size_m: float
    sign: int = 1
    estimate: str = "network"
    frames: int | None = None

    def to_metres(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        px = np.stack([rows + self.origin_px[0], cols + self.origin_px[1]], axis=1)
        return self.sign * px * self.pixel_size_m

    def to_canvas(self, points_m: np.ndarray) -> np.ndarray:
        px = np.asarray(points_m, dtype=float) / (self.sign * self.pixel_size_m)
        return px - np.asarray(self.origin_px)

    @property
    def covered(self) -> np.ndarray:
        return self.weight > 0.3 * max(float(self.weight.max()), 1e-12)


class Recommender(Protocol):
    """Where to measure next."""

    name: str

    def suggest(self, view: ReconstructionView, n: int, visited_m: np.ndarray):
        """Up to ``n`` new (y, x) positions in metres and a dict describing the decision."""


def _candidates(region_center_m, region_extent_m, step_m: float) -> np.ndarray:
    """The fine grid over the region: ``step_m`` apart from its low edge, never past its high
    edge (an ``arange`` to the edge plus a tolerance could step 1e-12 m beyond it, outside a
    stage limit set at the edge)."""
    axes = []
    halves = np.broadcast_to(np.asarray(region_extent_m, dtype=float) / 2, (2,))
    for centre, half in zip(region_center_m, halves, strict=True):
        count = int(np.floor(2 * half / step_m + 1e-9)) + 1
        axes.append(np.clip(centre - half + step_m * np.arange(count), centre - half,
                            centre + half))
    yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _sample(map_: np.ndarray, view: ReconstructionView, points_m: np.ndarray) -> np.ndarray:
    canvas = view.to_canvas(points_m)
    return ndimage.map_coordinates(map_, canvas.T, order=1, mode="constant", cval=0.0)


def _greedy_pick(points: np.ndarray, scores: np.ndarray, n: int, visited: np.ndarray,
                 min_distance: float) -> np.ndarray:
    """Highest scores first, never closer than ``min_distance`` to a visited or chosen point."""
    chosen: list[np.ndarray] = []
    taken = [np.asarray(v) for v in visited]
    for idx in np.argsort(scores)[::-1]:
        if len(chosen) >= n or scores[idx] <= 0:
            break
        p = points[idx]
        if taken and np.min(np.linalg.norm(np.asarray(taken) - p, axis=1)) < min_distance:
            continue
        chosen.append(p)
        taken.append(p)
    return np.asarray(chosen).reshape(-1, 2)


def structure_map(view: ReconstructionView, sigma_px: float = 2.0) -> np.ndarray:
    """Local structure of the stitched object: smoothed gradient magnitude, 0 where uncovered.

    Gradients of the complex object catch amplitude and phase features alike and ignore a
    constant phase offset.
    """
    obj = view.object
    gy = ndimage.gaussian_filter(obj.real, sigma_px, order=(1, 0)) + 1j * ndimage.gaussian_filter(
        obj.imag, sigma_px, order=(1, 0))
    gx = ndimage.gaussian_filter(obj.real, sigma_px, order=(0, 1)) + 1j * ndimage.gaussian_filter(
        obj.imag, sigma_px, order=(0, 1))
    magnitude = np.sqrt(np.abs(gy) ** 2 + np.abs(gx) ** 2)
    # Erode the coverage so the artificial edge of the measured area is not a "feature".
    inner = ndimage.binary_erosion(view.covered, iterations=int(3 * sigma_px) + 1)
    return ndimage.gaussian_filter(magnitude * inner, 2 * sigma_px)


def seen_mask(view: ReconstructionView, points_m: np.ndarray, radius_px: float) -> np.ndarray:
    """Canvas pixels within ``radius_px`` of a measured point (and, for the network
    estimate, with stitching weight): where the estimate has data about the object."""
    shape = view.object.shape
    if not len(points_m):
        return np.zeros(shape, dtype=bool)
    px = np.round(view.to_canvas(points_m)).astype(int)
    inside = ((px >= 0) & (px < np.array(shape))).all(axis=1)
    marks = np.ones(shape, dtype=bool)
    marks[px[inside, 0], px[inside, 1]] = False
    if marks.all():
        return np.zeros(shape, dtype=bool)
    seen = ndimage.distance_transform_edt(marks) <= radius_px
    if view.estimate == "network":
        seen &= view.weight > 0
    return seen


def deviation_rms(view: ReconstructionView, seen: np.ndarray, sigma_px: float) -> np.ndarray:
    """RMS deviation of the object from its background in a Gaussian window of ``sigma_px``:
    ``sqrt(G * |O - B|^2) / |B|`` on ``seen`` pixels (0 elsewhere), ``B`` the complex median
    of the seen object.

    ``G * |O - B|^2`` is the local variance plus the squared local mean contrast: zero on a
    flat (empty) background whatever its global phase, raised by amplitude and phase
    structure alike.
    """
    obj = np.asarray(view.object, dtype=np.complex64)
    if not seen.any():
        return np.zeros(obj.shape, dtype=np.float32)
    values = obj[seen]
    background = complex(np.median(values.real), np.median(values.imag))
    deviation = np.where(seen, np.abs(obj - background) ** 2, 0.0)
    # normalised convolution: the unseen canvas neither adds nor dilutes
    num = ndimage.gaussian_filter(deviation, sigma_px)
    den = ndimage.gaussian_filter(seen.astype(np.float64), sigma_px)
    energy = np.where(seen, num / np.maximum(den, 1e-6), 0.0)
    return (np.sqrt(energy) / max(abs(background), 1e-6)).astype(np.float32)


def _noise_floor(values: np.ndarray, noise_factor: float, max_fraction: float,
                 minimum: float = 0.0) -> float:
    """Structure below this is taken for reconstruction noise: ``noise_factor`` times the 25th
    percentile (the flat background of a sample with localised structure), but never more than
    ``max_fraction`` of the strongest structure (a sample structured everywhere), and never
    less than ``minimum``."""
    if not values.size:
        return minimum
    return float(max(minimum, min(noise_factor * np.percentile(values, 25),
                                  max_fraction * values.max())))


@dataclass
class FeatureRecommender:
    """Fine points where the best current estimate has structure (coarse overview -> zoom in).

    1. *Structure* (:meth:`structure`): the RMS deviation of the estimate (``view.object``:
       the refined image when ``view.estimate == "refined"``) from its background at the
       ``sigma_m`` scale (:func:`deviation_rms`), only where the estimate has data
       (within ``2 footprint_m`` of a frame it holds, :func:`seen_mask`), less a noise floor
       (:func:`_noise_floor`, at least ``min_contrast``), scaled so that the 90th percentile
       of the structure is 1 (clipped): a faint feature counts as much as a strong one.
    2. *Need*: structure times the shortfall of the probe-footprint density of the points
       measured so far (overview included; Gaussians of ``footprint_m``) against that of a
       raster at the fine step.
    3. Candidates on the fine grid are chosen one at a time, each where a footprint gathers
       the most need, which the new point's footprint then reduces. Points therefore go to
       every structured area, the margins a probe needs around it included, and never to
       empty background or to structure already sampled finely. They keep ``0.9 fine_step_m``
       from each other and from the measured points. None is suggested when the best would
       gather less than ``min_score`` (1 = a footprint of fully needed structure), so the plan
       stops ("nothing left to measure") once the structure is covered, before the budget.

    Parameters
    ----------
    region_center_m, region_extent_m : (float, float)
        Where fine points may go.
    fine_step_m : float
        Spacing of the fine candidate grid and the minimum distance between points.
    footprint_m : float, optional
        Probe-footprint scale of a measured point (Gaussian sigma, metres); default
        ``fine_step_m`` (a fine step is typically a fifth to a third of the probe diameter).
    sigma_m : float, optional
        Window of the structure measure; default ``fine_step_m / 2``.
    noise_factor, max_noise_fraction, min_contrast : float
        The noise floor: ``noise_factor`` times the 25th percentile of the structure measure,
        at most ``max_noise_fraction`` of its maximum, at least ``min_contrast`` (an RMS
        deviation of 3 % of the background: fainter structure is not steered to, and an
        empty, noisy image asks for no points).
    min_score : float
        Smallest gathered need worth a frame (0 to 1).
    """

    region_center_m: tuple[float, float]
    region_extent_m: tuple[float, float]
    fine_step_m: float
    name: str = "feature"
    footprint_m: float | None = None
    sigma_m: float | None = None
    noise_factor: float = 2.5
    max_noise_fraction: float = 0.2
    min_contrast: float = 0.03
    min_score: float = 0.01

    def _footprint_px(self, view: ReconstructionView) -> float:
        return (self.footprint_m or self.fine_step_m) / view.pixel_size_m

    def structure(self, view: ReconstructionView, visited_m: np.ndarray) -> np.ndarray:
        """Structure density in [0, 1] on the canvas (0 = flat background, noise or unseen)."""
        visited = np.asarray(visited_m, dtype=float).reshape(-1, 2)
        if view.frames is not None:
            visited = visited[: view.frames]
        seen = seen_mask(view, visited, 2 * self._footprint_px(view))
        sigma_px = max((self.sigma_m or self.fine_step_m / 2) / view.pixel_size_m, 0.5)
        rms = deviation_rms(view, seen, sigma_px)
        values = rms[seen]
        floor = _noise_floor(values, self.noise_factor, self.max_noise_fraction,
                             self.min_contrast)
        density = np.clip(rms - floor, 0, None) * seen
        above = density[density > 0]
        if not above.size:
            return density
        return np.clip(density / float(np.percentile(above, 90)), 0, 1)

    def suggest(self, view: ReconstructionView, n: int, visited_m: np.ndarray):
        visited = np.asarray(visited_m, dtype=float).reshape(-1, 2)
        structure = self.structure(view, visited)
        footprint_px = self._footprint_px(view)
        step_px = self.fine_step_m / view.pixel_size_m
        # footprint density of a raster at the fine step (Gaussians of peak 1)
        target = 2 * np.pi * footprint_px ** 2 / step_px ** 2
        density = _footprint_density(view, visited, footprint_px, structure.shape)
        candidates = _candidates(self.region_center_m, self.region_extent_m, self.fine_step_m)
        candidates = candidates[_far_from(candidates, visited, 0.9 * self.fine_step_m)]
        cand_px = view.to_canvas(candidates)
        open_ = np.ones(len(candidates), dtype=bool)
        chosen: list[int] = []
        gains: list[float] = []
        first = 0.0
        while len(chosen) < n and open_.any():
            need = structure * np.clip(1 - density / target, 0, 1)
            # need gathered by a footprint at each candidate: 1 = all of it fully needed
            gathered = ndimage.gaussian_filter(need, footprint_px)
            scores = ndimage.map_coordinates(gathered, cand_px.T, order=1, mode="constant",
                                             cval=0.0)
            scores[~open_] = -1.0
            best = int(np.argmax(scores))
            if not chosen:
                first = float(scores[best])
            if scores[best] < self.min_score:
                break
            chosen.append(best)
            gains.append(float(scores[best]))
            _add_footprint(density, cand_px[best], footprint_px)
            open_ &= np.linalg.norm(candidates - candidates[best], axis=1) >= (
                0.9 * self.fine_step_m)
        picked = candidates[chosen].reshape(-1, 2)
        return picked, {"score_max": first,
                        "score_mean_chosen": float(np.mean(gains)) if gains else 0.0,
                        "structure_fraction": float((structure > 0).mean()),
                        "estimate": view.estimate}


def _far_from(points: np.ndarray, others: np.ndarray, distance: float) -> np.ndarray:
    """Mask of ``points`` at least ``distance`` from every one of ``others``."""
    if not len(others) or not len(points):
        return np.ones(len(points), dtype=bool)
    from scipy.spatial import cKDTree

    nearest, _ = cKDTree(others).query(points, k=1)
    return nearest >= distance


def _footprint_density(view: ReconstructionView, points_m: np.ndarray, sigma_px: float,
                       shape) -> np.ndarray:
    """Sum of peak-1 Gaussians of ``sigma_px`` at the points, on the canvas."""
    density = np.zeros(shape, dtype=np.float64)
    if not len(points_m):
        return density
    px = view.to_canvas(points_m)
    counts = np.zeros(shape, dtype=np.float64)
    r = np.clip(np.round(px).astype(int), 0, np.array(shape) - 1)
    np.add.at(counts, (r[:, 0], r[:, 1]), 1.0)
    return ndimage.gaussian_filter(counts, sigma_px) * (2 * np.pi * sigma_px ** 2)


def _add_footprint(density: np.ndarray, centre_px: np.ndarray, sigma_px: float) -> None:
    half = int(np.ceil(4 * sigma_px))
    cy, cx = int(round(centre_px[0])), int(round(centre_px[1]))
    y0, y1 = max(cy - half, 0), min(cy + half + 1, density.shape[0])
    x0, x1 = max(cx - half, 0), min(cx + half + 1, density.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    density[y0:y1, x0:x1] += np.exp(-((yy - centre_px[0]) ** 2 + (xx - centre_px[1]) ** 2)
                                    / (2 * sigma_px ** 2))


@dataclass
class UncertaintyRecommender:
    """Points where the network disagrees with itself (overlap variance) or coverage is thin."""

    region_center_m: tuple[float, float]
    region_extent_m: tuple[float, float]
    fine_step_m: float
    coverage_weight: float = 0.5
    name: str = "uncertainty"

    def suggest(self, view: ReconstructionView, n: int, visited_m: np.ndarray):
        unc = ndimage.gaussian_filter(view.uncertainty, 2.0)
        unc = unc / max(float(unc.max()), 1e-12)
        coverage = view.weight / max(float(view.weight.max()), 1e-12)
        score_map = unc + self.coverage_weight * (1 - np.clip(coverage, 0, 1))
        candidates = _candidates(self.region_center_m, self.region_extent_m, self.fine_step_m)
        scores = _sample(score_map, view, candidates)
        picked = _greedy_pick(candidates, scores, n, visited_m, 0.9 * self.fine_step_m)
        return picked, {"score_max": float(scores.max(initial=0)),
                        "uncertainty_mean": float(view.uncertainty[view.covered].mean())
                        if view.covered.any() else 0.0}


@dataclass
class OptimizerRecommender:
    """Adapter: a bluesky-adaptive 1.0 ``Optimizer`` (``suggest(n)``, ``ingest(points)``)
    drives the feedback plan. The objective it maximises is the local structure of the live
    reconstruction at the points it proposed.

    Parameters
    ----------
    optimizer : object
        Implements ``suggest(n) -> list[dict]`` (each with ``"_id"`` and the two positioner
        names as keys) and ``ingest(list[dict])``.
    y_key, x_key : str
        The keys of the suggestion dicts holding the stage positions (metres).
    """

    optimizer: object
    y_key: str
    x_key: str
    name: str = "optimizer"

    def __post_init__(self) -> None:
        self._pending: list[dict] = []

    def suggest(self, view: ReconstructionView, n: int, visited_m: np.ndarray):
        score_map = structure_map(view)
        if self._pending:
            points = np.array([[p[self.y_key], p[self.x_key]] for p in self._pending])
            values = _sample(score_map, view, points)
            self.optimizer.ingest([{**p, "structure": float(v)}
                                   for p, v in zip(self._pending, values, strict=True)])
        suggestions = list(self.optimizer.suggest(n))
        self._pending = suggestions
        points = np.array([[s[self.y_key], s[self.x_key]] for s in suggestions]).reshape(-1, 2)
        return points, {"suggested": len(points)}


def make_recommender(strategy, *, region_center_m, region_extent_m, fine_step_m):
    """A recommender by name (``"feature"``, ``"uncertainty"``) or the object itself."""
    if not isinstance(strategy, str):
        return strategy
    if strategy == "feature":
        return FeatureRecommender(tuple(region_center_m), tuple(region_extent_m), fine_step_m)
    if strategy == "uncertainty":
        return UncertaintyRecommender(tuple(region_center_m), tuple(region_extent_m), fine_step_m)
    raise InvalidInputError(
        f"strategy: 'feature', 'uncertainty' or a Recommender, got {strategy!r}"
    )
