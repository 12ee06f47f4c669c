"""Stitching that adapts to the data: crop="auto" stitches every candidate in one network pass,
and the crop is chosen from the scan (agreement with a better estimate, or the residual)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.models import ptychopinn
from bluesky_ptychopinn.recon import StreamingReconstructor
from bluesky_ptychopinn.recon._crop_choice import CropChooser
from bluesky_ptychopinn.synthetic import make_object


@pytest.fixture(scope="module")
def scan():
    obj = make_object("cells", (160, 160), seed=3)
    probe = physics.make_probe("zone_plate", 64, 44e-9, 8_800)
    pos = physics.scan_pattern("fermat", (70.0, 70.0), step=6.0) + 80
    counts = np.asarray(physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=1)
                        .counts, dtype=np.float32)
    torch.manual_seed(0)
    model = ptychopinn(channels=4, base_width=4).eval()
    return obj, probe, pos, counts, model


def test_auto_stitches_every_candidate_as_a_fixed_crop_would(scan):
    _, _, pos, counts, model = scan
    auto = StreamingReconstructor(model, object_shape=(160, 160), crop="auto", device="cpu")
    auto.add(counts, pos)
    auto.flush()
    assert auto.crop_candidates == (16, 20, 24, 32, 40) and auto.crop == 24
    for crop in (16, 32):
        fixed = StreamingReconstructor(model, object_shape=(160, 160), crop=crop, device="cpu")
        fixed.add(counts, pos)
        np.testing.assert_allclose(auto.snapshot(crop).object, fixed.finish().object, atol=1e-5)
    np.testing.assert_allclose(auto.snapshot().object, auto.snapshot(24).object)
    with pytest.raises(InvalidInputError, match="not stitched"):
        auto.snapshot(30)
    with pytest.raises(InvalidInputError, match="crop"):
        StreamingReconstructor(model, crop="widest")


def test_choose_crop_takes_the_lowest_finite_score(scan):
    _, _, pos, counts, model = scan
    recon = StreamingReconstructor(model, object_shape=(160, 160), crop="auto", device="cpu")
    assert recon.choose_crop(lambda snap: 0.0) == {}  # nothing stitched yet: nothing to choose
    recon.add(counts, pos)
    recon.flush()
    wanted = {16: 3.0, 20: float("nan"), 24: 2.0, 32: 1.0, 40: float("inf")}
    scores = recon.choose_crop(lambda snap: wanted[snap.stats["crop"]])
    assert recon.crop == 32 and scores[20] != scores[20]  # nan reported, never chosen
    recon.choose_crop(lambda snap: float("nan"))
    assert recon.crop == 32  # no finite score: the crop stays


def test_agreement_with_a_reference_picks_the_crop_that_matches_it(scan):
    _, _, pos, counts, model = scan
    recon = StreamingReconstructor(model, object_shape=(160, 160), crop="auto", device="cpu")
    recon.add(counts, pos)
    recon.flush()
    target = recon.snapshot(40)
    chooser = CropChooser()
    scores = chooser.choose(recon, reference=(target.object, target.origin_px))
    assert recon.crop == 40 and scores[40] == pytest.approx(-1.0, abs=1e-3)
    assert all(scores[c] > scores[40] for c in (16, 20, 24, 32))


def test_residual_choice_uses_a_bounded_sample_of_frames(scan):
    _, probe, pos, counts, model = scan
    recon = StreamingReconstructor(model, object_shape=(160, 160), crop="auto", device="cpu")
    chooser = CropChooser(sample_size=32)
    for lo in range(0, len(pos), 40):
        chooser.observe(counts[lo : lo + 40], pos[lo : lo + 40])
        recon.add(counts[lo : lo + 40], pos[lo : lo + 40])
    recon.flush()
    assert chooser.seen == len(pos) and len(chooser._amplitudes) == 32
    scores = chooser.choose(recon, probe)
    assert set(scores) == set(recon.crop_candidates)
    assert all(np.isfinite(v) and 0 <= v < 1 for v in scores.values())
    assert recon.crop == min(scores, key=scores.get)
    assert chooser.maybe_choose(recon, probe) == {}  # within every_s of the last choice
