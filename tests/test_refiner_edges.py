"""The streaming refiner and the live run at their edges: frames that arrive after the probe
was re-centred, the frame bound under concurrent adds, a network image offered while the start
is being chosen, a restart in the middle of a pass, long refinements, dark frames, frames that
the crop empties and a run that has failed (found in review; each test failed before its fix).
"""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.callbacks._reconstruction import RunReconstruction
from bluesky_ptychopinn.callbacks._settings import WorkerSettings
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.metadata import PtychoMetadata
from bluesky_ptychopinn.metrics import compare_objects
from bluesky_ptychopinn.models._ptychopinn import ptychopinn
from bluesky_ptychopinn.recon import PIEOptions, RefinerThread, StreamingRefiner
from bluesky_ptychopinn.synthetic import make_object

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scan():
    obj = make_object("cells", (112, 112), seed=4)
    probe = physics.make_probe("zone_plate", SIZE, 40e-9, 8_800)
    pos = physics.scan_pattern("fermat", (64.0, 64.0), step=3.0) + 56
    counts = np.asarray(physics.simulate_diffraction(obj, probe, pos, photons=1e6,
                                                     seed=0).counts, dtype=np.float32)
    return obj, probe, pos, counts


def _refiner(probe, shape, **kw) -> StreamingRefiner:
    return StreamingRefiner(probe, object_shape=shape, start=kw.pop("start", "flat"),
                            options=PIEOptions(device="cpu", progress=False, seed=0), **kw)


def test_frames_after_a_probe_recentring_go_with_the_rolled_probe(scan):
    obj, probe, pos, counts = scan
    guess = np.roll(np.asarray(probe), (3, -4), axis=(-2, -1))  # off-centre: it gets rolled
    half = len(pos) // 2
    split = _refiner(guess, obj.shape)
    split.add(counts[:half], pos[:half])
    split.run(max_epochs=1)
    roll = split.snapshot().probe_roll_px
    assert roll != (0.0, 0.0)  # the case under test: re-centred before the rest came
    split.add(counts[half:], pos[half:])
    split.run(max_epochs=6)
    placed = split._pos_t.double().numpy()
    expected = pos - split.origin - np.asarray(split.snapshot().probe_roll_px)
    np.testing.assert_allclose(placed, expected, atol=1e-3)  # old and new frames alike
    whole = _refiner(guess, obj.shape)
    whole.add(counts, pos)
    whole.run(max_epochs=7)

    def auc(r):
        return compare_objects(r.snapshot().object, obj, crop=28,
                               taper_px=8)["frc_auc_0.5_phase"]

    assert auc(whole) > 0.9
    assert auc(split) > auc(whole) - 0.05  # was 0.45 against 0.99


def test_max_frames_holds_while_an_ingest_is_under_way(scan):
    _, probe, pos, counts = scan
    r = _refiner(probe, (112, 112), max_frames=50)
    r.add(counts[:40], pos[:40])
    append = r._store.append

    def append_while_another_thread_adds(amplitudes):
        r.add(counts[40:80], pos[40:80])  # what the serve loop may do at this moment
        append(amplitudes)

    r._store.append = append_while_another_thread_adds
    r._ingest()
    r._store.append = append
    r._ingest()
    assert r.n_frames == 50 and r.frames_dropped == 30


def test_a_network_image_offered_during_the_start_choice_is_weighed_later(scan):
    obj, probe, pos, counts = scan
    r = _refiner(probe, obj.shape, start="auto")
    r.add(counts, pos)
    first = (obj.astype(np.complex64), np.ones(obj.shape, np.float32), (0.0, 0.0))
    candidates = r._candidates

    def offered_meanwhile(seed):
        r.offer_seed(*first)  # the network's first image, while the start is being chosen
        return candidates(seed)

    r._candidates = offered_meanwhile
    r.step(0.0, max_updates=1)
    r._candidates = candidates
    assert r.start == "flat" and r._weighed_seed is None  # not seen: not marked weighed
    r.run(max_epochs=1)
    r.run(max_epochs=0.5)  # (weighing happens as a slice begins)
    # The first network image is weighed whenever it comes: after the first pass.
    assert r.reconsiderations and r.reconsiderations[0]["frames"] == len(pos)


def test_a_restart_from_the_network_starts_a_new_pass(scan):
    obj, probe, pos, counts = scan
    r = _refiner(probe, obj.shape, start="auto")
    r.add(counts, pos)
    r.run(max_epochs=1.5)  # half way through pass 2
    assert 0 < r._visited < r.n_frames
    r.offer_seed(obj.astype(np.complex64), np.ones(obj.shape, np.float32), (0.0, 0.0))
    r.step(0.0, max_updates=1)  # the truth as "network image": it must win
    assert r.start == "network" and r.reconsiderations[-1]["chosen"] == "network"
    assert r._visited == 1  # the one update since the restart
    passes = r.passes
    r.run(max_epochs=1)
    assert r.passes == passes + 1
    # The pass that spans the restart measured only the network start's estimate.
    assert r.error_history[-1] < 0.5 * r.error_history[passes - 1]


def test_run_does_not_wait_for_a_network_image_that_never_comes(scan):
    obj, probe, pos, counts = scan
    r = _refiner(probe, obj.shape, start="auto", wait_for_seed_frames=10**6)
    r.add(counts, pos)
    assert not r.ready  # waiting for the network, as asked
    snap = r.run(max_epochs=1)
    assert snap.epochs == pytest.approx(1.0) and snap.start == "flat"


def test_all_zero_frames_are_refused_with_a_clear_error(scan):
    _, probe, pos, _ = scan
    r = _refiner(probe, (112, 112))
    with pytest.raises(InvalidInputError, match="all-zero frame"):
        r.add(np.zeros((4, SIZE, SIZE), np.float32), pos[:4])
    assert r.n_frames == 0 and not r.ready


def test_the_publish_interval_survives_a_long_refinement(scan):
    _, probe, _, _ = scan
    thread = RefinerThread(_refiner(probe, (112, 112)), snapshot_interval_s=0.5)
    thread.latest = object()  # published before
    thread._publishes = 5000  # ~40 min at 0.5 s; 2.0 ** 1024 raised OverflowError
    assert thread._interval() == 0.5


def _live_run(refine: str | None, sent: list, budget_s: float = 3.0) -> RunReconstruction:
    model = ptychopinn(frame_size=32, channels=1, base_width=4, depth=1).eval()
    md = PtychoMetadata(detector_key="det", positioner_keys={"y": "sy", "x": "sx"},
                        energy_ev=8800, detector_distance_m=2.0, detector_pixel_size_m=75e-6,
                        frame_size=64, probe={"model": "zone_plate"})
    settings = WorkerSettings(refine=refine, batch_size=4, device="cpu",
                              refine_budget_s=budget_s)
    run = RunReconstruction(model, {}, settings, md, "raw-uid-0001",
                            lambda kind, uid, payload: sent.append(kind))
    run.start({"uid": "raw-uid-0001"})
    return run


def test_a_frame_the_crop_leaves_empty_is_rejected_alone():
    sent: list = []
    run = _live_run(None, sent)
    frames = np.zeros((4, 64, 64), np.float32)
    frames[:3, 24:40, 24:40] = 100.0
    frames[3, 0, 0] = 1.0  # one stray count outside the 32-px crop
    run._reconstruct(frames, np.zeros((4, 2)))
    assert run.frames_done == 3
    assert run.rejected == {"empty_after_crop": 1} and run.failed is None


def test_a_failed_run_is_not_refined_after_its_stop():
    sent: list = []
    run = _live_run("rpie", sent, budget_s=3.0)
    rng = np.random.default_rng(0)
    frames = rng.poisson(50.0, (32, 64, 64)).astype(np.float32)
    positions = np.stack(np.meshgrid(np.arange(4) * 2e-7, np.arange(8) * 2e-7),
                         -1).reshape(-1, 2)
    run._reconstruct(frames, positions)
    assert run.refiner is not None
    run.fail("the network broke")
    run.stop({"exit_status": "success"})
    after = sent[sent.index("failed") + 1:]
    assert after == ["finished"]  # no refined or final image of a failed run
    assert run.refine_after_stop_s == 0.0
    assert run.refiner.done.wait(5)  # and its thread was stopped


def test_a_position_far_away_is_refused_before_it_allocates(scan):
    _, probe, pos, counts = scan
    r = _refiner(probe, (112, 112), max_canvas_px=1024)
    r.add(counts[:8], pos[:8])
    glitch = pos[8:16].copy()
    glitch[3] = (1e6, 50.0)  # one encoder reading far away
    with pytest.raises(InvalidInputError, match="max_canvas_px"):
        r.add(counts[8:16], glitch)
    r.add(counts[8:16], pos[8:16])  # the refiner goes on with sane positions
    r.run(max_epochs=1)
    assert r.n_frames == 16 and max(r.obj.shape) < 1024
