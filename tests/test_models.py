"""The network, its physics decoder, grouping and checkpoint files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import CheckpointError, InvalidInputError
from bluesky_ptychopinn.models import (
    PhysicsDecoder,
    PtychoPINNConfig,
    load_model,
    merge_overlapping_patches,
    poisson_nll,
    ptychopinn,
    read_model_card,
    save_model,
)
from bluesky_ptychopinn.training import (
    group_offsets,
    group_quadrants,
    group_random,
    quadrant_groups_for_inference,
)


@pytest.mark.parametrize("n,c,depth", [(64, 1, 3), (64, 4, 3), (128, 1, 4), (128, 4, 3)])
def test_network_shapes_for_n64_and_n128(n, c, depth):
    model = ptychopinn(frame_size=n, channels=c, base_width=4, depth=depth, attention=c == 4)
    out = model(torch.rand(2, c, n, n) * 100, torch.tensor([0.1, 0.2]))
    assert out.shape == (2, c, n, n) and out.dtype == torch.complex64
    amplitude, phase = model.forward_parts(torch.rand(2, c, n, n), 1.0)
    assert (amplitude >= 0).all() and (phase.abs() <= np.pi).all()


def test_input_scaling_makes_the_network_blind_to_photon_level():
    model = ptychopinn(base_width=4).eval()
    counts = torch.rand(3, 1, 64, 64) * 50
    from bluesky_ptychopinn.models import input_scale

    a = model(counts, input_scale(counts))
    b = model(counts * 1000, input_scale(counts * 1000))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="channels"):
        PtychoPINNConfig(channels=3)
    with pytest.raises(ValueError, match="power of two"):
        PtychoPINNConfig(frame_size=96)


# --- physics decoder -------------------------------------------------------------------------


def _object(shape=(128, 128), seed=0):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.uniform(size=shape), 2)
    base = (base - base.min()) / np.ptp(base)
    return ((1.2 - 0.4 * base) * np.exp(1j * (2 * base - 1))).astype(np.complex64)


def test_merge_keeps_patches_that_already_agree():
    obj = torch.from_numpy(_object())
    offsets = torch.tensor([[[-3.0, -4.0], [-3.0, 4.0], [3.0, -4.0], [3.0, 4.0]]])
    patches = physics.extract_patches(obj, torch.tensor([64.0, 64.0]) + offsets[0], 32)[None]
    merged = merge_overlapping_patches(patches, offsets)
    assert (merged - patches).abs().max() < 1e-5


def test_merge_averages_patches_that_disagree():
    offsets = torch.zeros(1, 4, 2)  # all members on the same spot: merge = weighted mean
    patches = torch.randn(1, 4, 16, 16, dtype=torch.complex64)
    merged = merge_overlapping_patches(patches, offsets)
    torch.testing.assert_close(merged[0, 0], patches[0].mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged[0, 3], merged[0, 0])


def test_physics_decoder_reproduces_the_simulator_and_the_loss_prefers_the_truth():
    """The decoder is the physics package's forward model: true patches give the simulator's
    expected counts, and the Poisson loss is lower for them than for a perturbed object."""
    obj = _object()
    probe = physics.make_probe("kb", 64, 40e-9, 8_800)
    pos = np.array([[60.0, 60.0], [60.0, 66.0], [66.0, 60.0], [66.0, 66.0]])
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0)
    patches = physics.extract_patches(torch.from_numpy(obj), torch.from_numpy(pos).float(), 64)
    offsets = torch.from_numpy(pos - pos.mean(0)).float()[None]
    decoder = PhysicsDecoder(overlap=True)
    predicted = decoder(patches[None], offsets, torch.from_numpy(probe)[None],
                        torch.tensor([1e6]))
    np.testing.assert_allclose(predicted[0].numpy(), sim.expected.numpy(), rtol=2e-3, atol=0.5)
    counts = sim.counts[None]
    good = poisson_nll(predicted, counts)
    wrong = decoder(patches[None] * torch.exp(0.3j * torch.randn(1, 4, 64, 64)), offsets,
                    torch.from_numpy(probe)[None], torch.tensor([1e6]))
    assert float(good) < float(poisson_nll(wrong, counts))
    assert abs(float(good)) < 0.05  # a deviance: close to 0 for the true model


def test_poisson_loss_ignores_masked_pixels():
    counts = torch.full((1, 1, 8, 8), 10.0)
    predicted = counts.clone()
    predicted[..., 4, 4] = 1e6  # wildly wrong, but on a masked pixel
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 4, 4] = False
    assert float(poisson_nll(predicted, counts, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(poisson_nll(predicted, counts)) > 100


# --- grouping --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["raster", "fermat", "jittered_raster", "concentric"])
def test_quadrant_groups_are_in_fixed_order_and_never_padded(pattern):
    pos = physics.scan_pattern(pattern, (60.0, 60.0), step=5.0, seed=1)
    groups = group_quadrants(pos, seed=0)
    assert groups.shape[1] == 4 and len(groups) > len(pos) / 3
    assert len(np.unique(groups, axis=0)) == len(groups) or len(groups) < 5
    member = pos[groups]
    # channel order TL, TR, BL, BR: TL is above and left of BR, TR right of BL.
    assert (member[:, 0, 0] < member[:, 3, 0]).all() and (member[:, 0, 1] < member[:, 3, 1]).all()
    assert (member[:, 1, 1] > member[:, 2, 1]).all()
    offsets = group_offsets(pos, groups)
    np.testing.assert_allclose(offsets.mean(axis=1), 0, atol=1e-9)


def test_quadrant_grouping_respects_distance_limits_and_reports_impossible_ones():
    pos = physics.raster_scan((40.0, 40.0), 5.0)
    groups = group_quadrants(pos, max_distance=8.0, seed=0)
    member = pos[groups]
    pairwise = np.linalg.norm(member[:, :, None] - member[:, None], axis=-1)
    assert pairwise.max() <= 2 * 8.0  # every member is within 8 px of the same anchor
    with pytest.raises(InvalidInputError, match="no 4-quadrant group"):
        group_quadrants(pos, max_distance=2.0)


def test_random_groups_and_inference_groups():
    pos = physics.fermat_spiral_scan((50.0, 50.0), 4.0)
    groups = group_random(pos, 4, seed=0)
    assert groups.shape[1] == 4 and all(len(set(g)) == 4 for g in groups)
    inference = quadrant_groups_for_inference(pos[:5], pos)
    assert inference.shape == (5, 4) and (inference >= 0).all()
    # Even a single frame gets a group (no padding with zero frames).
    assert quadrant_groups_for_inference(pos[:1], pos[:1]).shape == (1, 4)


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = ptychopinn(base_width=4, channels=4).eval()
    save_model(model, tmp_path / "m", provenance={"probes": [{"name": "kb", "sha256": "ab"}]})
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, card = load_model(tmp_path / "m")
    assert card["provenance"]["probes"][0]["name"] == "kb"
    x = torch.rand(2, 4, 64, 64) * 10
    torch.testing.assert_close(loaded(x, 0.3), model(x, 0.3))


def test_checkpoint_with_wrong_hash_is_refused(tmp_path):
    save_model(ptychopinn(base_width=4), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tmp_path / "m")


def test_checkpoint_with_mismatched_config_is_refused(tmp_path):
    save_model(ptychopinn(base_width=4), tmp_path / "m")
    card_path = tmp_path / "m" / "model.json"
    card = json.loads(card_path.read_text())
    card["architecture"]["base_width"] = 8
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_model(tmp_path / "m")
    card["architecture"]["channels"] = 3
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="invalid architecture"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a bluesky-ptychopinn model"):
        read_model_card(tmp_path)
