"""The PIE step schedule: a constant step keeps fitting noise; the settled step stops that.

The schedule is judged against the truth of a simulated low-dose scan (FRC-AUC of the phase
against the object the frames were made from), never against the engine's own error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import metrics, physics
from bluesky_ptychopinn.recon import PIEOptions, StepSchedule, StreamingRefiner
from bluesky_ptychopinn.synthetic import make_object

N = 32
BOX = (slice(24, 72), slice(24, 72))


def test_the_step_stays_at_one_while_the_error_falls():
    schedule = StepSchedule()
    for error in (1.0, 0.8, 0.7, 0.65, 0.62):
        schedule.end_pass(error, n_frames=100)
        assert schedule.step == 1.0
    assert schedule.settled_at is None


def test_a_flat_pass_settles_and_the_step_then_decays_as_one_over_k():
    schedule = StepSchedule(half_passes=2)
    for error in (1.0, 0.5, 0.4999):  # 0.02 % lower: settled at pass 3
        schedule.end_pass(error, n_frames=100)
    assert schedule.settled_at == 3
    steps = []
    for _ in range(4):
        schedule.end_pass(0.4999, n_frames=100)
        steps.append(schedule.step)
    np.testing.assert_allclose(steps, [1 / 1.5, 1 / 2, 1 / 2.5, 1 / 3])


@pytest.mark.parametrize("error, frames", [(0.6, 100), (0.5, 120)],
                         ids=["the error rises", "the frame count grows"])
def test_new_information_resets_the_step(error, frames):
    schedule = StepSchedule()
    for value in (1.0, 0.5, 0.5, 0.5, 0.5):
        schedule.end_pass(value, n_frames=100)
    assert schedule.step < 1.0
    schedule.end_pass(error, n_frames=frames)
    assert schedule.step == 1.0 and schedule.settled_at is None


def test_a_refined_probe_needs_five_flat_passes_in_a_row():
    schedule = StepSchedule.for_options(PIEOptions(probe_update=True))
    # A blind run's stall (two flat passes) and its escape: no settling.
    for error in (1.0, 0.5, 0.4999, 0.4998, 0.45, 0.40, 0.35):
        schedule.end_pass(error, n_frames=100)
    assert schedule.settled_at is None
    for _ in range(5):
        schedule.end_pass(0.35, n_frames=100)
    assert schedule.settled_at == 12
    assert StepSchedule.for_options(PIEOptions(probe_update=False)).patience == 1


def test_the_schedule_is_off_when_asked():
    assert not StepSchedule.for_options(PIEOptions(probe_update=False, anneal=False)).enabled
    off = StepSchedule(enabled=False)
    for value in (1.0, 0.5, 0.5, 0.5):
        off.end_pass(value, n_frames=10)
    assert off.step == 1.0


@pytest.fixture(scope="module")
def low_dose_scan():
    """1e3 photons a frame: noise, not the algorithm, limits the image after a few passes."""
    probe = physics.make_probe("zone_plate", N, 40e-9, 8_800)
    truth = make_object("test_chip", (96, 96), seed=0)
    grid = np.arange(20, 77, 3.0)
    positions = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    positions = positions + np.random.default_rng(0).normal(0, 0.3, positions.shape)
    counts = physics.simulate_diffraction(truth, probe, positions, photons=1e3,
                                          seed=0).counts.numpy()
    return probe, truth, positions, counts


def _phase_auc(obj: np.ndarray, truth: np.ndarray) -> float:
    return float(metrics.compare_objects(obj[BOX], truth[BOX], taper_px=6)["frc_auc_0.5_phase"])


def _refine(scan, anneal: bool, passes: int = 10) -> tuple[list[float], StreamingRefiner]:
    probe, truth, positions, counts = scan
    torch.manual_seed(0)
    options = PIEOptions(device="cpu", probe_update=False, progress=False, anneal=anneal)
    refiner = StreamingRefiner(probe, object_shape=(96, 96), options=options, start="flat")
    refiner.add(counts, positions)
    scores = []
    for _ in range(passes):
        refiner.run(max_epochs=3)
        scores.append(_phase_auc(refiner.obj.numpy(), truth))
    assert tuple(refiner.origin) == (0.0, 0.0)  # the canvas is the truth's grid
    return scores, refiner


def test_a_settled_step_keeps_a_low_dose_image_from_degrading(low_dose_scan):
    constant, _ = _refine(low_dose_scan, anneal=False)
    settled, refiner = _refine(low_dose_scan, anneal=True)
    print(f"\nphase FRC-AUC every 3 passes, constant step: {np.round(constant, 3).tolist()}"
          f"\n                        settled step:  {np.round(settled, 3).tolist()}")
    assert refiner.schedule.settled_at is not None
    # Measured: constant 0.70 after 30 passes (peak 0.77), settled 0.84.
    assert settled[-1] > constant[-1] + 0.05
    assert settled[-1] > max(constant)
    # Once settled, more passes never cost quality.
    assert settled[-1] >= max(settled) - 0.01


def test_new_frames_bring_the_full_step_back(low_dose_scan):
    probe, truth, positions, counts = low_dose_scan
    half = len(positions) // 2
    options = PIEOptions(device="cpu", probe_update=False, progress=False)
    refiner = StreamingRefiner(probe, object_shape=(96, 96), options=options, start="flat")
    refiner.add(counts[:half], positions[:half])
    refiner.run(max_epochs=15)
    assert refiner.schedule.step < 1.0
    refiner.add(counts[half:], positions[half:])
    refiner.run(max_epochs=1)
    assert refiner.schedule.step == 1.0
    refiner.run(max_epochs=20)
    assert _phase_auc(refiner.obj.numpy(), truth) > 0.8


def test_a_restart_is_not_compared_with_the_estimate_it_replaced():
    schedule = StepSchedule()
    for error in (1.0, 0.5, 0.4, 0.3999):
        schedule.end_pass(error, n_frames=100)
    assert schedule.settled_at == 4
    schedule.restart()  # e.g. the refiner restarts from the network's image
    schedule.end_pass(0.41, n_frames=100)  # its first pass: no reference, not "flat"
    assert schedule.settled_at is None and schedule.step == 1.0
    schedule.end_pass(0.35, n_frames=100)
    assert schedule.step == 1.0
