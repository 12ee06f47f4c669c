"""The live beamline pipeline end to end: real RunEngine, real ophyd devices, real HDF5 files,
a real Tiled server over HTTP on 127.0.0.1, the shipped default model."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _faults import FailingModel
from bluesky import RunEngine
from bluesky.utils import RunEngineInterrupted
from bluesky_tiled_plugins import TiledWriter
from tiled.queries import Key

from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.catalog import TiledUnavailableError, connect, replay_run
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.models import ModelRegistry
from bluesky_ptychopinn.plans import ptycho_scan, ptycho_scan_with_feedback


@pytest.fixture(scope="module")
def model():
    net, _ = ModelRegistry().load("default")
    return net


def _engine(tiled, live):
    client = tiled.client()
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(TiledWriter(client, batch_size=20))
    live.subscribe(TiledWriter(client, batch_size=20))
    RE.subscribe(live)
    return RE, client


def _scan(bl, RE, n_side=8, **kw):
    dx = bl.pixel_size_m
    return RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                          pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                          step_m=5 * dx, **kw))


@pytest.mark.parametrize("inline", [False, True], ids=["hdf5", "inline"])
def test_raw_run_to_derived_run_read_back_from_tiled(tiled, model, inline):
    live = LiveReconstruction("default", batch_size=16, snapshot_every=32, torch_threads=1,
                              publish_interval_s=0.0)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("cells", write_path=None if inline else tiled.detector_dir, seed=1)
    result = _scan(bl, RE)
    state = live.wait(timeout=120)
    raw_uid = result.run_start_uids[0]
    assert state.failed is None and state.frames_done == 64
    raw = client[raw_uid]
    frames = raw["primary"][bl.detector.image_key].read()
    assert frames.shape == (64, 64, 64) and frames.sum() > 0  # through Tiled (HDF5 or zarr)
    derived_uids = list(client.search(Key("start.original_run_uid") == raw_uid))
    assert derived_uids == [state.derived_uid]
    derived = client[state.derived_uid]
    assert derived.start["plan_name"] == "ptychopinn_reconstruction"
    assert derived.start["model"]["sha256"] and derived.start["ptycho"]["energy_ev"] == 8_800
    assert derived.stop["exit_status"] == "success"
    snapshots = derived["snapshots"]
    amplitude = snapshots["object_amplitude"].read()
    assert amplitude.ndim == 3 and amplitude.shape[0] >= 2 and np.isfinite(amplitude).all()
    assert snapshots["frames"].read()[-1] == 64
    assert derived["metrics"]["frames_done"].read()[-1] == 64


def test_replay_with_the_same_model_reproduces_the_reconstruction(tiled, model):
    # The crop is pinned: crop="auto" follows the refined image, whose progress depends on
    # wall time (the chosen crop is recorded in each snapshot event and the stop document).
    live = LiveReconstruction(model, batch_size=16, snapshot_every=1000, torch_threads=1,
                              crop=24)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("test_chip", write_path=tiled.detector_dir, seed=2)
    raw_uid = _scan(bl, RE, n_side=7).run_start_uids[0]
    first = live.wait(timeout=120)
    again = replay_run(client, raw_uid, model="default", batch_size=50, crop=24)
    assert again.derived_uid != first.derived_uid
    derived = list(client.search(Key("start.original_run_uid") == raw_uid))
    assert set(derived) == {first.derived_uid, again.derived_uid}
    a = client[first.derived_uid]["snapshots"]["object_phase"][-1]
    b = client[again.derived_uid]["snapshots"]["object_phase"][-1]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_feedback_concentrates_fine_points_where_the_sample_has_structure(tiled, model):
    live = LiveReconstruction(model, batch_size=32, snapshot_every=64, torch_threads=1)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("quadrant_features", write_path=tiled.detector_dir, seed=3)
    dx = bl.pixel_size_m
    region = (150 * dx, 150 * dx)
    result = RE(ptycho_scan_with_feedback(
        bl.detector, bl.stage, live, geometry=bl.ptycho_metadata(), region_extent_m=region,
        coarse_step_m=25 * dx, fine_step_m=6 * dx, strategy="feature", budget=160,
        points_per_decision=40))
    summary = result.plan_result
    assert summary["decisions"] >= 2 and summary["frames"] <= 160
    primary = client[result.run_start_uids[0]]["primary"].read()
    fine = np.asarray(primary["feedback_iteration"]) > 0
    ys = np.asarray(primary[bl.stage.y.name])[fine]
    xs = np.asarray(primary[bl.stage.x.name])[fine]
    # quadrant_features puts all structure in the top-left quadrant (y < 0, x < 0).
    in_quadrant = ((ys < 0) & (xs < 0)).mean()
    assert in_quadrant > 0.6, in_quadrant
    feedback = client[result.run_start_uids[0]]["feedback"].read()
    assert len(feedback["feedback_n_points"]) == summary["decisions"]


def test_pause_resume_and_abort_keep_both_runs_consistent(tiled, model):
    live = LiveReconstruction(model, batch_size=16, torch_threads=1)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=4)
    count = {"events": 0}

    def pause_once(name, doc):
        if name == "event":
            count["events"] += 1
            if count["events"] == 10:
                # As a user's Ctrl-C would: from outside the RunEngine's event loop thread.
                threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    token = RE.subscribe(pause_once)
    with pytest.raises(RunEngineInterrupted):
        _scan(bl, RE, n_side=6)
    assert RE.state == "paused"
    result = RE.resume()
    RE.unsubscribe(token)
    state = live.wait(timeout=120)
    assert result.exit_status == "success" and state.frames_done == 36

    count["events"] = 0
    token = RE.subscribe(pause_once)
    with pytest.raises(RunEngineInterrupted):
        _scan(bl, RE, n_side=6)
    RE.abort(reason="test abort")
    RE.unsubscribe(token)
    state = live.wait(timeout=120)
    derived = client[state.derived_uid]
    assert derived.stop["exit_status"] == "abort"
    raw = client[state.raw_uid]
    assert raw.stop["exit_status"] == "abort"
    assert len(raw["primary"][bl.detector.image_key].read()) == state.frames_done >= 9


def test_a_failure_inside_the_reconstruction_never_touches_the_scan(tiled, model):
    faulty = FailingModel(model, fail_on_call=3, message="CUDA out of memory (injected)")
    live = LiveReconstruction(faulty, batch_size=8, torch_threads=1)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=5)
    result = _scan(bl, RE, n_side=6)
    state = live.wait(timeout=120)
    assert result.exit_status == "success"
    raw = client[result.run_start_uids[0]]
    assert raw["primary"][bl.detector.image_key].read().shape[0] == 36  # nothing lost
    derived = client[state.derived_uid]
    assert derived.stop["exit_status"] == "fail"
    assert "out of memory" in derived.stop["reason"]


def test_nan_pixels_are_masked_not_the_frames_and_empty_frames_are_counted(tiled, model):
    """How masked pixels often arrive: NaN. The pixel is masked for the run (and filled in for
    the network), the frame reconstructed; a frame with no counts is rejected and counted."""
    live = LiveReconstruction(model, batch_size=8, torch_threads=1)
    RE, client = _engine(tiled, live)
    bl = sim_beamline("cells", write_path=None, seed=6)
    bl.detector.dtype = np.dtype(np.float32)
    original = bl.detector._compute_frame
    calls = {"n": 0}

    def sometimes_nan():
        frame = original().astype(np.float32)
        calls["n"] += 1
        if bl.stage.x.position > 0:
            frame[0, 0] = np.nan
        if calls["n"] % 9 == 0:
            frame[:] = 0.0
        return frame

    bl.detector._compute_frame = sometimes_nan
    result = _scan(bl, RE, n_side=6)
    state = live.wait(timeout=120)
    assert result.exit_status == "success" and state.failed is None
    assert state.frames_rejected == 4 and state.frames_done == 32
    stop = client[state.derived_uid].stop
    assert stop["exit_status"] == "success"
    assert stop["ptychopinn"]["frames_rejected_by_cause"] == {"empty": 4}
    assert stop["ptychopinn"]["masked_detector_pixels"] == 1
    phase = client[state.derived_uid]["snapshots"]["object_phase"].read()[-1]
    assert np.isfinite(phase).all()


def test_a_dead_tiled_server_is_a_clear_error():
    with pytest.raises(TiledUnavailableError, match="cannot reach Tiled"):
        connect("http://127.0.0.1:9/api/v1", api_key="x")


class _RandomSearch:
    """A minimal bluesky-adaptive 1.0 optimizer (random search over the region, best-first):
    the protocol is what matters, any Optimizer can take its place."""

    def __init__(self, region_m: float, y_key: str, x_key: str, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.region, self.y_key, self.x_key = region_m, y_key, x_key
        self.ingested: list[dict] = []
        self._count = 0

    def suggest(self, num_points: int | None = None):
        half = self.region / 2
        out = []
        for _ in range(num_points or 1):
            self._count += 1
            y, x = self.rng.uniform(-half, half, 2)
            out.append({"_id": self._count, self.y_key: float(y), self.x_key: float(x)})
        return out

    def ingest(self, points):
        self.ingested.extend(points)

    def get_best_points(self):
        ranked = sorted(self.ingested, key=lambda p: -p["structure"])
        return [(p["_id"], {self.y_key: p[self.y_key], self.x_key: p[self.x_key]},
                 {"structure": p["structure"]}) for p in ranked[:1]]


def test_a_bluesky_adaptive_optimizer_drives_the_feedback_plan(model):
    from bluesky_adaptive.protocols import Optimizer

    from bluesky_ptychopinn.plans import OptimizerRecommender

    bl = sim_beamline("cells", write_path=None, seed=7)
    dx = bl.pixel_size_m
    optimizer = _RandomSearch(100 * dx, bl.stage.y.name, bl.stage.x.name)
    assert isinstance(optimizer, Optimizer)
    live = LiveReconstruction(model, batch_size=16, torch_threads=1)
    RE = RunEngine(call_returns_result=True)
    RE.subscribe(live)
    recommender = OptimizerRecommender(optimizer, bl.stage.y.name, bl.stage.x.name)
    result = RE(ptycho_scan_with_feedback(
        bl.detector, bl.stage, live, geometry=bl.ptycho_metadata(),
        region_extent_m=(100 * dx, 100 * dx), coarse_step_m=25 * dx, strategy=recommender,
        budget=41, points_per_decision=8))
    assert result.plan_result["frames"] == 41 and result.plan_result["stop_reason"] == "budget"
    # every point it suggested was measured and scored back from the live reconstruction
    assert len(optimizer.ingested) >= 8
    assert all(np.isfinite(p["structure"]) for p in optimizer.ingested)
