"""The streaming reconstructor: batching, stitching, uncertainty, canvas growth, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.recon._streaming import StreamingReconstructor, stitch_window


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(0)
    obj = np.exp(1j * rng.uniform(-0.3, 0.3, (160, 160))).astype(np.complex64)
    probe = physics.make_probe("zone_plate", 64, 40e-9, 8_800)
    pos = physics.scan_pattern("fermat", (60.0, 60.0), step=5.0) + 80
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=0)
    return sim.counts, pos


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ptychopinn(frame_size=64, channels=1, base_width=4).eval()


def test_batch_size_does_not_change_the_result(scan, model):
    counts, pos = scan
    one = StreamingReconstructor(model, object_shape=(160, 160), input_scale=0.2, device="cpu")
    one.add(counts, pos)
    many = StreamingReconstructor(model, object_shape=(160, 160), input_scale=0.2, device="cpu",
                                  batch_size=7)
    for lo in range(0, len(pos), 13):
        many.add(counts[lo : lo + 13], pos[lo : lo + 13])
    a, b = one.finish(), many.finish()
    assert a.n_frames == b.n_frames == len(pos)
    np.testing.assert_allclose(a.object, b.object, atol=1e-5)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-5)


def test_coverage_follows_the_scan_and_uncertainty_measures_disagreement(scan, model):
    counts, pos = scan
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    recon.add(counts, pos)
    snap = recon.snapshot()
    assert snap.weight[80, 80] > 0 and snap.weight[0, 0] == 0
    assert snap.object[0, 0] == 0
    # Same frame twice at the same place: the two predictions agree, no uncertainty there.
    same = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    same.add(torch.stack([counts[0], counts[0]]), np.stack([pos[0], pos[0]]))
    assert same.snapshot().n_frames == 0 and same.pending == 2  # held for the scale estimate
    same.flush()
    assert same.snapshot().uncertainty.max() < 1e-6
    # Different frames at the same place: disagreement shows up as variance.
    # An untrained network barely reacts to its input; sharpen its first layer so two different
    # frames give clearly different patches.
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.encoder[0].conv[0].weight.mul_(200)
    diff = StreamingReconstructor(sharp, object_shape=(160, 160), device="cpu")
    other = torch.zeros(64, 64)
    other[::4, ::4] = 1e4  # a very different pattern
    diff.add(torch.stack([counts[0], other]), np.stack([pos[0], pos[0]]))
    diff.flush()
    disagreement = diff.snapshot().uncertainty.max()
    assert disagreement > 1e-6 and disagreement > 100 * same.snapshot().uncertainty.max()


def test_canvas_grows_when_the_scan_leaves_it(scan, model):
    counts, pos = scan
    recon = StreamingReconstructor(model, object_shape=(96, 96), device="cpu")
    recon.add(counts[:10], pos[:10] - 200)  # far outside, negative coordinates
    snap = recon.finish()
    canvas_pos = pos[:10] - 200 - np.array(snap.origin_px)
    assert (canvas_pos >= 32).all()
    assert (canvas_pos <= np.array(snap.object.shape) - 32).all()
    assert snap.weight[tuple(np.round(canvas_pos[0]).astype(int))] > 0


def test_four_channel_models_stream_with_causal_quadrant_groups(scan):
    """C = 4 groups use only earlier frames, so the result does not depend on batching:
    a replay in one batch reproduces a live stream of small batches exactly."""
    counts, pos = scan
    torch.manual_seed(1)
    model = ptychopinn(frame_size=64, channels=4, base_width=4).eval()
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu", batch_size=32)
    for lo in range(0, len(pos), 7):
        recon.add(counts[lo : lo + 7], pos[lo : lo + 7])
    snap = recon.finish()
    assert snap.n_frames == len(pos) and np.isfinite(snap.object).all()
    replay = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    replay.add(counts, pos)
    np.testing.assert_allclose(replay.finish().object, snap.object, atol=1e-5)
    assert snap.stats["frames_per_s"] > 0
    with pytest.raises(InvalidInputError, match="finished"):
        recon.add(counts[:1], pos[:1])


@pytest.mark.parametrize(
    "frames,positions,message",
    [
        (torch.rand(4, 32, 32), np.zeros((4, 2)) + 80, "frame_size=64"),
        (torch.full((2, 64, 64), float("nan")), np.zeros((2, 2)) + 80, "non-finite"),
        (torch.zeros(2, 64, 64), np.zeros((2, 2)) + 80, "all-zero"),
        (-torch.ones(2, 64, 64), np.zeros((2, 2)) + 80, "negative"),
        (torch.rand(3, 64, 64), np.zeros((2, 2)) + 80, "2 positions for 3 frames"),
        (torch.rand(1, 64, 64), np.array([[np.nan, 1.0]]), "NaN"),
        (torch.rand(1, 64, 64) + 1j, np.zeros((1, 2)), "complex"),
    ],
    ids=["wrong-size", "nan", "all-zero", "negative", "length", "nan-position", "complex"],
)
def test_bad_batches_are_rejected_and_stitch_nothing(model, frames, positions, message):
    recon = StreamingReconstructor(model, object_shape=(160, 160), device="cpu")
    recon.add(torch.rand(2, 64, 64) * 10 + 1, np.full((2, 2), 80.0))
    recon.flush()
    before = recon.snapshot()
    with pytest.raises(InvalidInputError, match=message):
        recon.add(frames, positions)
    after = recon.snapshot()
    assert after.n_frames == before.n_frames == 2
    np.testing.assert_array_equal(after.object, before.object)


def test_stitch_window_is_a_tent_inside_the_crop():
    w = stitch_window(64, 32)
    assert w[32, 32] > 0.9 and w[0, 0] == 0 and w[31, 5] == 0
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0).flip(1))
