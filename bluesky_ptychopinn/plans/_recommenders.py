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
    "OptimizerRecommender",
    "make_recommender",
]


@dataclass
class ReconstructionView:
    """A snapshot plus the geometry to turn canvas pixels into stage metres.

    Canvas pixel (i, j) is object pixel (i, j) + ``origin_px``; object pixel p is at stage
    position ``sign * p * pixel_size_m`` (the live callback's convention, origin at stage 0).
    """

    object: np.ndarray
    weight: np.ndarray
    uncertainty: np.ndarray
    origin_px: tuple[float, float]
    pixel_size_m: float
    sign: int = 1

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
    cy, cx = region_center_m
    hy, hx = np.asarray(region_extent_m, dtype=float) / 2
    ys = np.arange(cy - hy, cy + hy + 1e-12, step_m)
    xs = np.arange(cx - hx, cx + hx + 1e-12, step_m)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
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


@dataclass
class FeatureRecommender:
    """Fine points where the reconstructed object has structure (coarse overview -> zoom in).

    Parameters
    ----------
    region_center_m, region_extent_m : (float, float)
        Where fine points may go.
    fine_step_m : float
        Spacing of the fine candidate grid and the minimum distance between points.
    """

    region_center_m: tuple[float, float]
    region_extent_m: tuple[float, float]
    fine_step_m: float
    name: str = "feature"

    def suggest(self, view: ReconstructionView, n: int, visited_m: np.ndarray):
        score_map = structure_map(view)
        candidates = _candidates(self.region_center_m, self.region_extent_m, self.fine_step_m)
        scores = _sample(score_map, view, candidates)
        picked = _greedy_pick(candidates, scores, n, visited_m, 0.9 * self.fine_step_m)
        chosen = _sample(score_map, view, picked) if len(picked) else np.zeros(0)
        return picked, {"score_max": float(scores.max(initial=0)),
                        "score_mean_chosen": float(chosen.mean()) if len(chosen) else 0.0}


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
