"""The plans honour the run's position convention: a stage in other units is sent its own
units, a mirrored stage (``position_sign = -1``) is steered to the structure, not to its
mirror image, and a recommender never overruns the budget or the region."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine

from bluesky_ptychopinn.callbacks import RunState
from bluesky_ptychopinn.devices import SampleStage, sim_beamline
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.physics import stage_to_pixels
from bluesky_ptychopinn.plans import FeatureRecommender, ptycho_scan, scan_points
from bluesky_ptychopinn.plans._feedback import _best_view, _checked_suggestion
from bluesky_ptychopinn.plans._recommenders import _candidates
from bluesky_ptychopinn.recon import Snapshot


def _collect(RE):
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def test_a_stage_in_micrometres_is_sent_micrometres():
    bl = sim_beamline("cells", write_path=None, seed=1)
    stage = SampleStage(name="ustage")
    stage.set_limits((-5.0, 5.0))  # micrometres
    RE = RunEngine()
    docs = _collect(RE)
    extent, step = (1.2e-6, 0.8e-6), 0.4e-6
    RE(ptycho_scan(bl.detector, stage, geometry={**bl.ptycho_metadata(), "position_units": "um"},
                   pattern="raster", extent_m=extent, step_m=step))
    start = next(d for n, d in docs if n == "start")
    assert start["ptycho"]["position_units"] == "um"
    events = [d for n, d in docs if n == "event"]
    read = np.array([[e["data"]["ustage_y"], e["data"]["ustage_x"]] for e in events])
    expected_m = scan_points("raster", extent, step_m=step)
    # The readings are micrometres; the callback's conversion brings back the metres planned.
    np.testing.assert_allclose(read, expected_m * 1e6, atol=1e-9)
    np.testing.assert_allclose(read * 1e-6, expected_m, atol=1e-15)


def test_limits_are_checked_in_the_stage_units_before_anything_moves():
    bl = sim_beamline("cells", write_path=None, seed=1)
    stage = SampleStage(name="ustage")
    stage.set_limits((-0.5, 0.5))  # micrometres: a 2 um scan does not fit
    RE = RunEngine()
    docs = _collect(RE)
    with pytest.raises(InvalidInputError, match=r"limits \[-0.5, 0.5\] um"):
        RE(ptycho_scan(bl.detector, stage,
                       geometry={**bl.ptycho_metadata(), "position_units": "um"},
                       pattern="raster", extent_m=(2e-6, 2e-6), step_m=0.5e-6))
    assert not docs  # refused before the run opened


def _state_with_feature_at(stage_m, sign: int, dx: float = 1e-8) -> RunState:
    """A run state whose stitched object has a textured disc where the live callback places
    the frames taken at stage position ``stage_m`` (its own stage_to_pixels mapping, sign
    included, with the canvas centred on the scan centre as the callback makes it)."""
    shape = (240, 240)
    centre_px = stage_to_pixels(np.zeros((1, 2)), dx, sign=sign)[0]
    origin = centre_px - np.array(shape) / 2
    feature_px = stage_to_pixels(np.asarray([stage_m]), dx, sign=sign)[0] - origin
    yy, xx = np.indices(shape)
    rng = np.random.default_rng(0)
    obj = np.ones(shape, np.complex64)
    disc = np.hypot(yy - feature_px[0], xx - feature_px[1]) < 14
    obj[disc] = (0.6 * np.exp(-1j * (0.3 + 0.3 * np.sin(0.7 * yy) * np.cos(0.5 * xx))))[disc]
    obj += (0.01 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))).astype(
        np.complex64)
    snap = Snapshot(obj, np.ones(shape, np.float32), np.zeros(shape, np.float32), 10**6,
                    (float(origin[0]), float(origin[1])))
    return RunState(raw_uid="r", snapshot=snap, pixel_size_m=dx)


@pytest.mark.parametrize("sign", [1, -1])
def test_fine_points_go_to_the_structure_whatever_the_position_sign(sign):
    dx, feature_m = 1e-8, (0.45e-6, 0.45e-6)
    view = _best_view(_state_with_feature_at(feature_m, sign, dx), sign)
    region = (1.6e-6, 1.6e-6)
    overview = scan_points("raster", region, step_m=16 * dx)
    points, _ = FeatureRecommender((0.0, 0.0), region, 5 * dx).suggest(view, 20, overview)
    assert len(points) >= 5
    distance = np.hypot(*(points - np.asarray(feature_m)).T)
    assert distance.max() < 0.3e-6, distance  # on the structure, not at its mirror image


def test_a_recommender_never_overruns_the_budget_nor_suggests_nan():
    many = np.zeros((39, 2))
    assert len(_checked_suggestion(many, 20, object())) == 20
    assert _checked_suggestion([], 5, object()).shape == (0, 2)
    with pytest.raises(InvalidInputError, match="non-finite"):
        _checked_suggestion([[0.0, np.nan]], 5, object())


def test_fine_candidates_never_step_past_the_region_edge():
    for k in range(1, 400):
        half = k * 1.1e-8 + 3.3e-7
        step = 2 * half / 7  # the region an exact number of steps: arange overshot by ~1e-22
        grid = _candidates((0.0, 0.0), (2 * half, 2 * half), step)
        assert grid.max() <= half and grid.min() >= -half
        assert len(np.unique(grid[:, 0])) == 8  # both edges kept


def test_the_feedback_plan_never_steers_from_an_earlier_run():
    """A live callback that is not subscribed to this RunEngine has only an earlier, finished
    run: the plan stops after its overview instead of steering from that run's image."""
    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.plans import ptycho_scan_with_feedback

    bl = sim_beamline("cells", write_path=None, seed=5)
    dx = bl.pixel_size_m
    live = LiveReconstruction("default", isolation="thread", refine=None, batch_size=16,
                              torch_threads=1)
    try:
        earlier = RunEngine()
        earlier.subscribe(live)
        earlier(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(20 * dx, 20 * dx), step_m=10 * dx))
        live.wait(timeout=60)
        RE = RunEngine(call_returns_result=True)  # the callback is not subscribed here
        result = RE(ptycho_scan_with_feedback(
            bl.detector, bl.stage, live, geometry=bl.ptycho_metadata(),
            region_extent_m=(40 * dx, 40 * dx), coarse_step_m=20 * dx, budget=30,
            wait_timeout_s=2.0))
    finally:
        live.close()
    summary = result.plan_result
    assert summary["frames"] == 9 and summary["decisions"] == 0
    assert "not seen this run" in summary["stop_reason"]
