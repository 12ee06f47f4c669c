"""The feature recommender on synthetic views: fine points go to structure, never to empty
background, nor to structure already sampled finely."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_ptychopinn.plans import FeatureRecommender, ReconstructionView, scan_points

DX = 1e-8  # metres per object pixel
SHAPE = (240, 240)
ORIGIN = (-120.0, -120.0)  # canvas pixel (0, 0) is object pixel (-120, -120): stage 0 centred
FINE, COARSE = 5 * DX, 16 * DX
REGION = (160 * DX, 160 * DX)
FEATURES = {"a": ((-45, -45), 14), "b": ((40, 35), 12)}  # (object px (y, x), radius px)
MARGIN = 15  # px: the probe margin around a feature that fine points may fill (3 footprints)


def _view(rng, weight=None, features=("a", "b")) -> ReconstructionView:
    """Flat background with reconstruction noise, textured discs where the features are."""
    yy, xx = np.indices(SHAPE) + np.array(ORIGIN)[:, None, None]
    obj = np.ones(SHAPE, complex)
    for name in features:
        (cy, cx), r = FEATURES[name]
        inside = np.hypot(yy - cy, xx - cx) < r
        texture = 0.2 + 0.2 * np.sin(0.7 * yy) * np.cos(0.5 * xx)
        obj[inside] = (1 - 0.5 * texture[inside]) * np.exp(-1j * texture[inside])
    obj = obj + 0.01 * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE))
    weight = np.ones(SHAPE, np.float32) if weight is None else weight
    return ReconstructionView(obj.astype(np.complex64), weight, np.zeros(SHAPE, np.float32),
                              ORIGIN, DX, estimate="refined")


def _distance_to_feature(points_m: np.ndarray, name: str) -> np.ndarray:
    (cy, cx), r = FEATURES[name]
    px = points_m / DX
    return np.hypot(px[:, 0] - cy, px[:, 1] - cx) - r


def _overview() -> np.ndarray:
    return scan_points("raster", REGION, step_m=COARSE)


def test_fine_points_fall_on_the_structure_not_on_the_empty_background():
    rng = np.random.default_rng(0)
    recommender = FeatureRecommender((0.0, 0.0), REGION, FINE)
    overview = _overview()
    points, info = recommender.suggest(_view(rng), 60, overview)
    assert len(points) == 60 and info["estimate"] == "refined"
    near = np.minimum(_distance_to_feature(points, "a"), _distance_to_feature(points, "b"))
    # every point on a feature or within its probe margin
    assert near.max() <= MARGIN, near.max()
    # both features get points, not only the first in the candidate order
    assert (_distance_to_feature(points, "a") <= MARGIN).sum() >= 15
    assert (_distance_to_feature(points, "b") <= MARGIN).sum() >= 15
    # points, not bands: at least the fine step from each other and from the overview
    every = np.concatenate([overview, points])
    d = np.linalg.norm(every[:, None] - every[None], axis=-1) + np.eye(len(every))
    assert d.min() >= 0.9 * FINE - 1e-12


def test_structure_already_sampled_finely_gets_no_more_points():
    rng = np.random.default_rng(1)
    recommender = FeatureRecommender((0.0, 0.0), REGION, FINE)
    (cy, cx), r = FEATURES["a"]
    fine_a = scan_points("raster", (2 * r + 30) * DX, center_m=(cy * DX, cx * DX), step_m=FINE)
    visited = np.concatenate([_overview(), fine_a])
    # The network's stitching weight is ~10x higher where it was sampled finely: coverage
    # must not be taken relative to that maximum (the coarse area would look unmeasured).
    weight = np.ones(SHAPE, np.float32)
    yy, xx = np.indices(SHAPE) + np.array(ORIGIN)[:, None, None]
    weight[np.hypot(yy - cy, xx - cx) < r + 20] = 10.0
    points, _ = recommender.suggest(_view(rng, weight=weight), 40, visited)
    assert len(points) > 10
    assert (_distance_to_feature(points, "b") <= MARGIN).all()


@pytest.mark.parametrize("estimate", ["network", "refined"])
def test_an_empty_sample_gets_no_fine_points(estimate):
    rng = np.random.default_rng(2)
    view = _view(rng, features=())
    view.estimate = estimate
    points, info = FeatureRecommender((0.0, 0.0), REGION, FINE).suggest(view, 40, _overview())
    # noise alone is not structure: a few stray points at most, and the plan can stop
    assert len(points) <= 4, len(points)


def test_the_estimate_only_counts_where_it_has_frames():
    """A refined image that holds only the overview's first rows: the rest is no data."""
    rng = np.random.default_rng(3)
    overview = _overview()
    view = _view(rng)
    first_rows = int((overview[:, 0] < 0).sum())  # rows above the centre: feature a only
    view.frames = first_rows
    points, _ = FeatureRecommender((0.0, 0.0), REGION, FINE).suggest(view, 80, overview)
    assert len(points) > 10
    assert (_distance_to_feature(points, "a") <= MARGIN).all()
