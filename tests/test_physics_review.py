"""Regression tests for the physics review (/tmp/review/phys/REPORT.md): each test failed before
its fix. References are independent of the code under test (analytic beams, plain numpy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bluesky_ptychopinn.physics import probe_at_sampling, resample_probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA_PX = 4.0  # beam width, in pixels of the first grid


def gaussian_beam(size: int, sigma_px: float, tilt: float = 0.3) -> np.ndarray:
    """A unit-power Gaussian beam with a small linear phase, centred on pixel (size//2, size//2)
    as the conventions want; wide enough in pixels to be band-limited on either grid."""
    c = np.arange(size) - size // 2
    field = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma_px**2)
                   + 1j * tilt * (c[:, None] + c[None, :]) / sigma_px)
    return (field / np.linalg.norm(field)).astype(np.complex64)[None]


def peak(probe: np.ndarray) -> tuple[int, int]:
    intensity = (np.abs(probe) ** 2).sum(0)
    return tuple(int(v) for v in np.unravel_index(int(intensity.argmax()), intensity.shape))


# -- item 1: resample_probe with an odd side N -------------------------------------------------

@pytest.mark.parametrize("n", [65, 33])
def test_resampling_an_odd_probe_to_its_own_size_is_the_identity(n):
    p = gaussian_beam(n, SIGMA_PX)
    q = resample_probe(p, n)
    np.testing.assert_allclose(q, p, atol=1e-6)
    assert peak(q) == (n // 2, n // 2)


@pytest.mark.parametrize(("n", "size"), [(63, 32), (65, 33), (129, 64)])
def test_an_odd_probe_is_fourier_resampled_to_the_analytic_beam_at_the_coarser_pixel(n, size):
    # Same field of view, coarser pixel: the beam is narrower by size / n in the new pixels,
    # still centred on pixel size // 2, and keeps its power (its spectrum fits the window).
    out = resample_probe(gaussian_beam(n, SIGMA_PX), size)
    ref = gaussian_beam(size, SIGMA_PX * size / n, tilt=0.3)
    assert peak(out) == (size // 2, size // 2)
    assert abs(np.vdot(out, ref)) > 0.999
    assert np.isclose(float(np.sum(np.abs(out) ** 2)), 1.0, atol=1e-3)


def test_probe_at_sampling_keeps_a_65_px_probe_centred():
    pixel_m = 20e-9
    out = probe_at_sampling(gaussian_beam(65, SIGMA_PX), pixel_m, 64, pixel_m * 65 / 64)
    ref = gaussian_beam(64, SIGMA_PX * 64 / 65)
    assert out.shape == (1, 64, 64)
    assert peak(out) == (32, 32)
    assert abs(np.vdot(out, ref)) > 0.999


def test_resample_probe_accepts_tensors_of_odd_size():
    p = torch.from_numpy(gaussian_beam(31, 3.0))
    torch.testing.assert_close(resample_probe(p, 31), p, atol=1e-6, rtol=0)


# -- items 2, 9 and 10: TrainingExperiment / GroupedSamples / poisson_nll ----------------------

N_TRAIN = 16


def small_experiment_data(n_side: int = 4, seed: int = 0):
    """A 16-px simulated experiment (noise-free counts) with its true object."""
    from bluesky_ptychopinn.physics import make_probe, raster_scan, simulate_diffraction

    probe = make_probe("airy", N_TRAIN, 20e-9, 8800)
    obj = np.exp(1j * np.random.default_rng(seed).uniform(-0.5, 0.5, (48, 48)))
    obj = obj.astype(np.complex64)
    positions = raster_scan((2.0 * (n_side - 1), 2.0 * (n_side - 1)), 2.0) + 24
    sim = simulate_diffraction(obj, probe, positions, photons=1e4, poisson=False, seed=seed)
    return sim.counts, positions, probe, obj


def predicted_over_measured(probe) -> float:
    from bluesky_ptychopinn.models import PhysicsDecoder
    from bluesky_ptychopinn.physics import extract_patches
    from bluesky_ptychopinn.training import GroupedSamples, TrainingExperiment

    counts, positions, _, obj = small_experiment_data()
    exp = TrainingExperiment(counts=counts, positions=positions, probe=probe, truth=obj)
    data = GroupedSamples([exp], channels=1, grouping="single")
    measured, offsets, e, members = data[0]
    patches = extract_patches(torch.from_numpy(obj), torch.as_tensor(positions[members.numpy()]),
                              N_TRAIN)
    predicted = PhysicsDecoder(overlap=False)(patches[None], offsets[None], data.probes[[e]],
                                              data.photons[[e]])
    return float(predicted.sum() / measured.sum())


def test_a_bare_2d_probe_is_one_mode_in_training():
    _, _, probe, _ = small_experiment_data()
    ratio_3d = predicted_over_measured(torch.from_numpy(probe))        # (1, N, N)
    ratio_2d = predicted_over_measured(torch.from_numpy(probe[0]))     # (N, N): M = 1 as well
    assert ratio_3d == pytest.approx(1.0, rel=1e-3)
    assert ratio_2d == pytest.approx(1.0, rel=1e-3)


def test_training_experiment_stores_the_probe_with_a_mode_axis():
    from bluesky_ptychopinn.training import GroupedSamples, TrainingExperiment

    counts, positions, probe, _ = small_experiment_data()
    exp = TrainingExperiment(counts=counts, positions=positions, probe=torch.from_numpy(probe[0]))
    assert tuple(exp.probe.shape) == (1, N_TRAIN, N_TRAIN)
    data = GroupedSamples([exp], channels=1, grouping="single")
    assert tuple(data.probes.shape) == (1, 1, N_TRAIN, N_TRAIN)


def test_masked_pixels_are_zeroed_and_kept_out_of_the_input_scale():
    from bluesky_ptychopinn.training import TrainingExperiment

    counts, positions, probe, _ = small_experiment_data()
    mask = torch.ones(N_TRAIN, N_TRAIN, dtype=torch.bool)
    mask[3, 5] = False
    clean = counts.clone()
    clean[:, 3, 5] = 0
    reference = TrainingExperiment(counts=clean, positions=positions,
                                   probe=torch.from_numpy(probe), mask=mask)
    for flag in (float("nan"), 2.0**32 - 1, float("inf"), -5.0):
        dirty = counts.clone()
        dirty[:, 3, 5] = flag
        exp = TrainingExperiment(counts=dirty, positions=positions,
                                 probe=torch.from_numpy(probe), mask=mask)
        assert float(exp.counts[:, 3, 5].abs().max()) == 0.0
        assert exp.input_scale == pytest.approx(reference.input_scale, rel=1e-6)
        assert exp.photons == pytest.approx(reference.photons, rel=1e-6)
    assert float(dirty[0, 3, 5]) == -5.0  # the caller's array is not changed


def test_poisson_nll_ignores_whatever_masked_pixels_hold_and_has_finite_gradients():
    from bluesky_ptychopinn.models import poisson_nll

    counts, _, _, _ = small_experiment_data(n_side=2)
    mask = torch.ones_like(counts, dtype=torch.bool)
    mask[:, 3, 5] = False
    clean = torch.where(mask, counts, 0.0)
    predicted = (clean * 1.1 + 0.01).requires_grad_(True)
    reference = poisson_nll(predicted, clean, mask)
    dirty = counts.clone()
    dirty[:, 3, 5] = float("nan")
    loss = poisson_nll(predicted, dirty, mask)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    loss.backward()
    assert bool(torch.isfinite(predicted.grad).all())
    assert float(predicted.grad[:, 3, 5].abs().max()) == 0.0


@pytest.mark.parametrize(("change", "message"), [
    (lambda c, p: (torch.zeros_like(c), p), "every frame is zero"),
    (lambda c, p: (c[:0], p[:0]), "no frames"),
    (lambda c, p: (c.index_fill(1, torch.tensor([2]), float("nan")), p), "not finite"),
    (lambda c, p: (c - 1e6, p), "negative"),
    (lambda c, p: (c, np.where(np.arange(len(p))[:, None] == 3, np.nan, p)), "positions"),
    (lambda c, p: (c, np.c_[p, p[:, :1]]), r"\(n, 2\)"),
    (lambda c, p: (c, p[:-1]), "for 16 frames"),
])
def test_degenerate_training_data_is_refused_with_a_clear_message(change, message):
    from bluesky_ptychopinn.errors import InvalidInputError
    from bluesky_ptychopinn.training import TrainingExperiment

    counts, positions, probe, _ = small_experiment_data()
    counts, positions = change(counts, positions)
    with pytest.raises(InvalidInputError, match=message):
        TrainingExperiment(counts=counts, positions=positions, probe=torch.from_numpy(probe))


def test_numpy_counts_probe_and_mask_are_accepted():
    from bluesky_ptychopinn.training import GroupedSamples, TrainingExperiment

    counts, positions, probe, _ = small_experiment_data()
    mask = np.ones((N_TRAIN, N_TRAIN), bool)
    from_numpy = TrainingExperiment(counts=counts.numpy(), positions=positions, probe=probe,
                                    mask=mask)
    from_torch = TrainingExperiment(counts=counts, positions=positions,
                                    probe=torch.from_numpy(probe), mask=torch.from_numpy(mask))
    assert isinstance(from_numpy.counts, torch.Tensor) and isinstance(from_numpy.probe,
                                                                       torch.Tensor)
    assert from_numpy.photons == pytest.approx(from_torch.photons)
    assert from_numpy.input_scale == pytest.approx(from_torch.input_scale)
    assert len(GroupedSamples([from_numpy], channels=4, grouping="quadrant")) > 0


# -- item 3: merge_overlapping_patches on consistent patches -----------------------------------

@pytest.mark.parametrize("n", [16, 15])
@pytest.mark.parametrize("common_fraction", [0.0, 0.3])
def test_merging_consistent_patches_a_whole_number_of_pixels_apart_is_the_identity(
        n, common_fraction):
    from bluesky_ptychopinn.models import merge_overlapping_patches
    from bluesky_ptychopinn.physics import extract_patches

    rng = np.random.default_rng(1)
    obj = torch.from_numpy(np.exp(1j * rng.uniform(-1, 1, (64, 64))).astype(np.complex64))
    # Groups on whole-pixel rasters with odd steps (centroid at .5 or 1/3), one on an even
    # step, all shifted together by common_fraction: the members are a whole number of pixels
    # apart, so the merge needs no interpolation.
    groups = [
        [[30, 30], [30, 33], [33, 30], [33, 33]],
        [[28, 31], [28, 32], [29, 31], [29, 32]],
        [[31, 29], [31, 30], [32, 31], [30, 31]],
        [[30, 30], [30, 32], [32, 30], [32, 32]],
    ]
    pos = torch.tensor(groups, dtype=torch.float64) + common_fraction
    patches = extract_patches(obj, pos.reshape(-1, 2), n).reshape(len(groups), 4, n, n)
    offsets = (pos - pos.mean(dim=1, keepdim=True)).float()
    merged = merge_overlapping_patches(patches, offsets)
    error = float((merged - patches).abs().max() / patches.abs().max())
    assert error < 1e-6


def test_merging_keeps_the_relative_offsets_of_sub_pixel_members():
    # A member half a pixel from the others is still placed half a pixel away: merging a patch
    # with a copy of itself declared 0.5 px off is not the identity (the shift is not rounded).
    from bluesky_ptychopinn.models import merge_overlapping_patches

    rng = np.random.default_rng(2)
    patch = torch.from_numpy(np.exp(1j * rng.uniform(-1, 1, (16, 16))).astype(np.complex64))
    patches = torch.stack([patch, patch])[None]
    offsets = torch.tensor([[[0.0, -0.25], [0.0, 0.25]]])
    merged = merge_overlapping_patches(patches, offsets)
    assert float((merged - patches).abs().max()) > 1e-2


# -- item 6: simulate_diffraction(seed=None) and torch's global generator ----------------------

def test_simulate_without_a_seed_follows_and_keeps_torchs_global_seed():
    from bluesky_ptychopinn.physics import make_probe, simulate_diffraction

    probe = make_probe("airy", 16, 20e-9, 8800)
    obj = np.ones((32, 32), np.complex64)
    runs = []
    with torch.random.fork_rng():  # leave the session's global generator as it was
        for _ in range(2):
            torch.manual_seed(123)
            sim = simulate_diffraction(obj, probe, [[16.0, 16.0]], photons=1e4)  # seed=None
            runs.append((sim.counts, torch.rand(3)))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    # The generator was advanced by the same draw both times, not re-seeded with fresh entropy.
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


# -- item 13: a model card that is not UTF-8 ---------------------------------------------------

def test_a_non_utf8_model_card_is_a_checkpoint_error_and_does_not_break_the_registry(tmp_path):
    from bluesky_ptychopinn.errors import CheckpointError
    from bluesky_ptychopinn.models import ModelRegistry, ptychopinn, read_model_card, save_model

    save_model(ptychopinn(frame_size=32, channels=1, base_width=4), tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_model_card(tmp_path / "bad")
    registry = ModelRegistry(tmp_path)
    cards = {card["name"]: card for card in registry.list()}
    assert "error" not in cards["good"]
    assert "not UTF-8" in cards["bad"]["error"]
    with pytest.raises(CheckpointError, match=r"'typo' not found.*known models: .*good"):
        registry.path("typo")


# -- items 7 and 8: trainer resume and early stopping ------------------------------------------

def tiny_training_data():
    from bluesky_ptychopinn.training import GroupedSamples, TrainingExperiment

    counts, positions, probe, obj = small_experiment_data(n_side=6)  # 36 frames: a val split
    exp = TrainingExperiment(counts=counts, positions=positions, probe=torch.from_numpy(probe),
                             truth=obj)
    return GroupedSamples([exp], channels=1, grouping="single")


TRAIN_CFG = {"batch_size": 16, "progress": False, "device": "cpu", "val_fraction": 0.2,
             "schedule": "constant", "grad_clip": 0}


def test_a_resumed_run_returns_the_best_validation_weights(tmp_path):
    from bluesky_ptychopinn.models import ptychopinn
    from bluesky_ptychopinn.training import TrainConfig, train

    data = tiny_training_data()
    common = dict(TRAIN_CFG, checkpoint_dir=str(tmp_path))
    torch.manual_seed(0)
    first = train(ptychopinn(frame_size=N_TRAIN, channels=1, base_width=4, depth=2), data,
                  TrainConfig(epochs=2, lr=1e-3, **common))
    assert (tmp_path / "best.safetensors").is_file()
    # One more epoch with a destructive learning rate: it cannot beat the saved best.
    resumed = train(ptychopinn(frame_size=N_TRAIN, channels=1, base_width=4, depth=2), data,
                    TrainConfig(epochs=3, lr=3.0, **common))
    assert len(resumed.history) == 3
    assert resumed.history[-1]["val_loss"] > resumed.best_val
    assert resumed.best_val == pytest.approx(first.best_val)
    for mine, best in zip(resumed.model.parameters(), first.model.parameters(), strict=True):
        torch.testing.assert_close(mine, best, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "trainer_state.json").read_text())["epoch"] == 3


def test_patience_ends_the_main_phase_and_fine_tuning_still_runs(tmp_path):
    from bluesky_ptychopinn.models import ptychopinn
    from bluesky_ptychopinn.training import TrainConfig, train

    data = tiny_training_data()
    # A vanishing learning rate: the validation loss cannot improve after epoch 1, so
    # patience=1 stops the main phase after epoch 2 and goes to the fine-tuning epoch (7).
    config = TrainConfig(epochs=6, finetune_epochs=1, patience=1, lr=1e-30,
                         checkpoint_dir=str(tmp_path), **TRAIN_CFG)
    result = train(ptychopinn(frame_size=N_TRAIN, channels=1, base_width=4, depth=2), data,
                   config)
    assert [h["epoch"] for h in result.history] == [1, 2, 7]
    assert [h["finetune"] for h in result.history] == [False, False, True]
    # The checkpoint records the jump: resuming does not run the skipped main epochs.
    assert json.loads((tmp_path / "trainer_state.json").read_text())["epoch"] == 7


# -- item 11: scan patterns refuse absurd point counts up front ---------------------------------

@pytest.mark.parametrize("pattern", ["raster", "jittered_raster", "fermat", "concentric"])
@pytest.mark.parametrize("step", [4e-8, 1e-3])
def test_a_scan_with_extent_and_step_in_different_units_is_refused_up_front(pattern, step):
    from bluesky_ptychopinn.errors import InvalidInputError
    from bluesky_ptychopinn.physics import scan_pattern

    with pytest.raises(InvalidInputError, match="same units"):
        scan_pattern(pattern, (200.0, 200.0), step=step)  # extent in px, step in metres


def test_ordinary_scans_are_still_made():
    from bluesky_ptychopinn.physics import scan_pattern

    assert len(scan_pattern("raster", (200.0, 200.0), step=4.0)) == 51 * 51
    assert len(scan_pattern("concentric", (2e-6, 2e-6), step=1e-7)) > 300
