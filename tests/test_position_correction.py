"""Position correction: the engines find where each frame's probe really was.

The shift estimate is checked against patches shifted by an independent interpolator
(scipy.ndimage's cubic spline), the engines against the true positions of simulated scans whose
given positions carry jitter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bluesky_ptychopinn import metrics, physics
from bluesky_ptychopinn.recon import (
    PIEOptions,
    StreamingRefiner,
    pie_reconstruct,
    position_shifts,
)
from bluesky_ptychopinn.synthetic import make_object

N = 32
SHAPE = (96, 96)
BOX = (slice(24, 72), slice(24, 72))


@pytest.mark.parametrize("shift", [(0.3, 0.0), (0.0, -0.25), (-0.2, 0.35)])
def test_the_shift_estimate_matches_a_spline_shifted_patch(shift):
    """The exit-wave update of a patch seen 'shift' pixels away is explained by that shift."""
    obj = make_object("cells", (64, 64), seed=2)
    probe = torch.from_numpy(physics.make_probe("mixed", N, 40e-9, 8_800, n_modes=2))
    centre = (slice(16, 48), slice(16, 48))
    # The patch at p + s is the object moved by -s (scipy's shift moves content by +s).
    moved = (ndimage.shift(obj.real, [-v for v in shift], order=3)
             + 1j * ndimage.shift(obj.imag, [-v for v in shift], order=3))
    patch = torch.from_numpy(obj[centre].astype(np.complex64))[None]
    seen = torch.from_numpy(moved[centre].astype(np.complex64))[None]
    delta = probe[None] * (seen - patch)[:, None]
    estimate = position_shifts(patch, probe, delta)[0].numpy()
    np.testing.assert_allclose(estimate, shift, atol=0.06)


@pytest.fixture(scope="module")
def jittered_scan():
    """1e5 photons a frame, given positions off by 0.8 px RMS per axis."""
    probe = physics.make_probe("zone_plate", N, 40e-9, 8_800)
    truth = make_object("test_chip", SHAPE, seed=1)
    grid = np.arange(22, 75, 3.0)
    true_positions = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    counts = physics.simulate_diffraction(truth, probe, true_positions, photons=1e5,
                                          seed=1).counts.numpy()
    given = true_positions + np.random.default_rng(1).normal(0, 0.8, true_positions.shape)
    return probe, truth, true_positions, given, counts


def _rms_error(positions: np.ndarray, truth: np.ndarray) -> float:
    error = positions - truth
    error -= error.mean(axis=0)  # a common shift is invisible (and removed by the engines)
    return float(np.sqrt((error**2).sum(axis=1).mean()))


def _auc(obj: np.ndarray, truth: np.ndarray) -> float:
    return float(metrics.compare_objects(obj[BOX], truth[BOX], taper_px=6)["frc_auc_0.5_phase"])


def _nrmse(obj: np.ndarray, truth: np.ndarray) -> float:
    return float(metrics.compare_objects(obj[BOX], truth[BOX], taper_px=6)["nrmse"])


def _refine(scan, correct: bool, positions: np.ndarray | None = None) -> StreamingRefiner:
    """25 known-probe passes over the scan at ``positions`` (default: the jittered ones)."""
    probe, _, _, given, counts = scan
    options = PIEOptions(device="cpu", probe_update=False, progress=False,
                         position_correction=correct)
    refiner = StreamingRefiner(probe, object_shape=SHAPE, options=options, start="flat")
    refiner.add(counts, given if positions is None else positions)
    refiner.run(max_epochs=25)
    assert tuple(refiner.origin) == (0.0, 0.0)  # the canvas is the truth's grid
    return refiner


def test_the_refiner_moves_jittered_positions_towards_the_truth(jittered_scan):
    _, truth, true_positions, given, _ = jittered_scan
    plain, corrected = _refine(jittered_scan, False), _refine(jittered_scan, True)
    before = _rms_error(given, true_positions)
    after = _rms_error(given + corrected.position_corrections, true_positions)
    auc_plain, auc_corrected = _auc(plain.obj.numpy(), truth), _auc(corrected.obj.numpy(), truth)
    err_plain, err_corrected = (_nrmse(plain.obj.numpy(), truth),
                                _nrmse(corrected.obj.numpy(), truth))
    print(f"\nposition error RMS {before:.3f} -> {after:.3f} px; phase FRC-AUC "
          f"{auc_plain:.3f} uncorrected, {auc_corrected:.3f} corrected; NRMSE {err_plain:.3f}, "
          f"{err_corrected:.3f}")
    assert after < 0.6 * before
    assert auc_corrected > auc_plain
    assert err_corrected < 0.8 * err_plain
    assert corrected.snapshot().position_correction_rms_px > 0.3
    assert not plain.position_corrections.any()
    # The mean move is removed: the object stays in the frame of the given positions.
    np.testing.assert_allclose(corrected.position_corrections.mean(axis=0), 0, atol=1e-6)


def test_exact_positions_stay_put(jittered_scan):
    _, truth, true_positions, _, _ = jittered_scan
    refiner = _refine(jittered_scan, True, positions=true_positions)
    assert refiner.snapshot().position_correction_rms_px < 0.15
    assert _auc(refiner.obj.numpy(), truth) > 0.9


def test_pie_reconstruct_returns_the_corrected_positions(jittered_scan):
    probe, truth, true_positions, given, counts = jittered_scan
    options = PIEOptions(n_epochs=25, device="cpu", probe_update=False, progress=False,
                         position_correction=True)
    result = pie_reconstruct(counts, given, probe, object_shape=SHAPE, options=options)
    assert _rms_error(result.positions, true_positions) < 0.6 * _rms_error(given, true_positions)


def test_position_gain_out_of_range_is_refused():
    from bluesky_ptychopinn.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="position_gain"):
        PIEOptions(position_gain=0).validate()


def test_reconstruct_correct_positions_writes_the_corrected_positions(jittered_scan, tmp_path):
    """`bluesky-ptychopinn reconstruct FILE --correct-positions`: the written positions are
    closer to the truth than the file's, and the summary says by how much they moved."""
    import json

    from typer.testing import CliRunner

    from bluesky_ptychopinn.cli import app
    from bluesky_ptychopinn.io import PtychoDataset, read_dataset, write_dataset

    probe, _, true_positions, given, counts = jittered_scan
    path = write_dataset(PtychoDataset(counts, given, probe), tmp_path / "jittered.npz")
    out = tmp_path / "corrected.npz"
    result = CliRunner().invoke(app, ["reconstruct", str(path), "--epochs", "25",
                                      "--no-probe-update", "--correct-positions",
                                      "--include-frames", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["position_correction_rms_px"] > 0.3
    written = read_dataset(out).positions_px
    assert _rms_error(written, true_positions) < 0.6 * _rms_error(given, true_positions)


def test_a_featureless_batch_gets_no_shift_and_the_run_goes_on():
    """Nothing fitted yet (a canvas of ones): zero shifts, not 0 / 0, even from pass 0."""
    ones = torch.ones(4, N, N, dtype=torch.complex64)
    probe = torch.ones(1, N, N, dtype=torch.complex64)
    delta = torch.randn(4, 1, N, N, dtype=torch.complex64)
    assert torch.equal(position_shifts(ones, probe, delta), torch.zeros(4, 2))


def test_positions_of_a_new_region_are_not_moved_on_their_first_visit(jittered_scan):
    """A scan that jumps to an unfitted region: the refiner goes on (no NaN positions) and the
    new frames' recorded moves match where their probe centres are."""
    probe, truth, true_positions, given, counts = jittered_scan
    left = given[:, 1] < 48
    options = PIEOptions(device="cpu", probe_update=False, progress=False,
                         position_correction=True, position_correction_start_epoch=0)
    refiner = StreamingRefiner(probe, object_shape=SHAPE, options=options, start="flat")
    refiner.add(counts[left], given[left])
    refiner.run(max_epochs=4)
    refiner.add(counts[~left], given[~left])
    refiner.run(max_epochs=6)
    assert np.isfinite(refiner.position_corrections).all()
    held = np.concatenate([given[left], given[~left]])
    np.testing.assert_allclose(refiner._pos_t.numpy() + refiner.origin,
                               held + refiner.position_corrections, atol=1e-3)


def test_correct_positions_is_refused_where_it_would_do_nothing(jittered_scan, tmp_path):
    from typer.testing import CliRunner

    from bluesky_ptychopinn.cli import app
    from bluesky_ptychopinn.io import PtychoDataset, write_dataset

    probe, _, _, given, counts = jittered_scan
    path = write_dataset(PtychoDataset(counts, given, probe), tmp_path / "jittered.npz")
    result = CliRunner().invoke(app, ["reconstruct", str(path), "--epochs", "2",
                                      "--correct-positions"])
    assert result.exit_code != 0 and "--epochs > 2" in result.output
    assert "Traceback" not in result.output
