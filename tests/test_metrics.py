"""Metrics against independent references and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.metrics import (
    apply_shift,
    compare_objects,
    frc,
    frc_auc,
    frc_threshold,
    nrmse,
    psnr,
    register_shift,
    remove_phase_plane,
    ssim,
)


def _smooth(shape=(128, 128), seed=0, sigma=3):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma)


def test_identical_images_have_frc_one_everywhere():
    img = _smooth()
    result = frc(img, img)
    np.testing.assert_allclose(result.frc[1:], 1.0, atol=1e-9)
    assert frc_auc(result, 0.5) == pytest.approx(1.0)


def test_independent_noise_has_frc_near_zero():
    rng = np.random.default_rng(1)
    result = frc(rng.standard_normal((256, 256)), rng.standard_normal((256, 256)))
    assert abs(result.frc[1:].mean()) < 0.02
    # Each ring's FRC of independent noise has a spread of about 1/sqrt(n_pixels / 2).
    spread = 1 / np.sqrt(result.n_pixels[1:] / 2)
    assert (np.abs(result.frc[1:]) < 4 * spread).mean() > 0.98


def test_frc_auc_cutoff_is_explicit_and_labelled():
    img = _smooth()
    noisy = img + 0.5 * img.std() * np.random.default_rng(2).standard_normal(img.shape)
    result = frc(noisy, img)
    assert frc_auc(result, 0.5) > frc_auc(result, 1.0)  # smooth image: high frequencies noisy
    with pytest.raises(InvalidInputError, match="cutoff"):
        frc_auc(result, 2.0)
    scores = compare_objects(np.exp(1j * noisy), np.exp(1j * img), taper_px=10)
    assert {"frc_auc_0.5_phase", "frc_auc_1.0_phase", "frc_auc_0.5_amplitude"} <= set(scores)


def test_threshold_curves_match_van_heel_formula():
    result = frc(_smooth(), _smooth(seed=1))
    n = result.n_pixels[10]
    half_bit = frc_threshold(result, 0.2071)[10]
    expected = (0.2071 + 1.9102 / np.sqrt(n)) / (1.2071 + 0.9102 / np.sqrt(n))
    assert half_bit == pytest.approx(expected, rel=1e-3)
    assert frc_threshold(result, 0.1)[10] < half_bit  # SNRt 0.1 is the looser criterion


def test_phase_ramp_and_offset_are_removed_exactly():
    truth = np.exp(1j * 0.8 * _smooth(seed=3) / _smooth(seed=3).std()) * (1 + 0.1 * _smooth())
    yy, xx = np.meshgrid(np.arange(128) - 64, np.arange(128) - 64, indexing="ij")
    ramp = np.exp(1j * (2.0 + 0.07 * yy - 0.05 * xx))  # includes 2 pi wraps across the image
    flattened = remove_phase_plane(truth * ramp, truth)
    err = np.abs(np.angle(flattened * np.conj(truth)))
    assert err.max() < 1e-5


def test_known_subpixel_shift_is_recovered():
    img = _smooth(seed=4, sigma=2)
    shifted = apply_shift(img, (3.3, -1.7))
    dy, dx = register_shift(shifted, img, upsample=50)
    assert abs(dy - 3.3) < 0.05 and abs(dx + 1.7) < 0.05


def test_psnr_matches_a_hand_computation_and_ssim_behaves():
    ref = np.linspace(0, 1, 100).reshape(10, 10)
    img = ref + 0.1
    assert psnr(img, ref) == pytest.approx(10 * np.log10(1.0 / 0.01))
    big = _smooth(seed=5)
    assert ssim(big, big) == pytest.approx(1.0)
    rng = np.random.default_rng(6)
    a = ssim(big + 0.1 * big.std() * rng.standard_normal(big.shape), big)
    b = ssim(big + 1.0 * big.std() * rng.standard_normal(big.shape), big)
    assert 1 > a > b


def test_nrmse_ignores_global_phase_and_scale():
    truth = np.exp(1j * _smooth(seed=7))
    assert nrmse(2 * truth * np.exp(1.2j), truth) < 1e-12
    assert nrmse(truth * np.exp(0.3j * _smooth(seed=8) / _smooth(seed=8).std()), truth) > 0.05


@pytest.mark.parametrize(
    "a,b,message",
    [
        (np.zeros((8, 8)), np.zeros((8, 9)), "shape"),
        (np.zeros((8, 8)), np.full((8, 8), np.nan), "NaN"),
        (np.zeros(8), np.zeros(8), "2-D"),
    ],
)
def test_invalid_input_is_a_clear_error(a, b, message):
    with pytest.raises(InvalidInputError, match=message):
        frc(a, b)
