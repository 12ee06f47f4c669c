"""Metrics against known answers, hand computations and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.metrics import (
    HALF_BIT,
    SUSTAINED_RINGS,
    FRCResult,
    align_global_phase,
    apply_shift,
    compare_objects,
    crop_edges,
    fit_phase_plane,
    frc,
    frc_auc,
    frc_auc_key,
    frc_resolution,
    frc_threshold,
    nrmse,
    psnr,
    register_shift,
    remove_phase_plane,
    ssim,
    tukey_taper,
)


def _smooth(shape=(128, 128), seed=0, sigma=3.0):
    """Unit-variance smooth random image."""
    img = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return img / img.std()


def _object(shape=(128, 128), seed=0, sigma=3.0):
    """A complex object with amplitude and phase contrast (phase spans about +-2 rad)."""
    amplitude = 1 + 0.1 * _smooth(shape, seed + 100, sigma)
    return amplitude * np.exp(0.8j * _smooth(shape, seed, sigma))


# --- FRC ------------------------------------------------------------------------------------


def test_identical_images_have_frc_one_in_every_ring():
    for img in (_smooth(), _object(), _smooth((96, 128), seed=1)):
        result = frc(img, img)
        np.testing.assert_allclose(result.frc, 1.0, atol=1e-12)
        assert result.freq[0] == 0 and result.freq[-1] == pytest.approx(1.0)
        assert len(result.freq) == min(img.shape) // 2 + 1
    assert frc_auc(frc(_object(), _object()), cutoff=0.5) == pytest.approx(1.0)


def test_ring_pixel_counts_cover_the_disc_up_to_nyquist():
    result = frc(np.ones((128, 128)), np.ones((128, 128)))
    # Rings are rounded radii: ring 64 (Nyquist) ends at radius 64.5.
    assert result.n_pixels[0] == 1
    assert result.n_pixels.sum() == pytest.approx(np.pi * 64.5**2, rel=0.01)
    # Rings 0..k cover the disc of radius k + 0.5 (single rings fluctuate with the lattice).
    k = np.arange(10, 64)
    np.testing.assert_allclose(np.cumsum(result.n_pixels)[k], np.pi * (k + 0.5) ** 2, rtol=0.02)


def test_independent_noise_has_frc_near_zero():
    rng = np.random.default_rng(1)
    result = frc(rng.standard_normal((256, 256)), rng.standard_normal((256, 256)))
    mean = result.frc[1:].mean()
    print(f"independent noise 256x256: mean FRC above DC {mean:+.4f}, "
          f"max |FRC| {np.abs(result.frc[1:]).max():.3f}")
    assert abs(mean) < 0.05
    # Each ring's FRC of independent noise spreads by about 1/sqrt(n_pixels / 2).
    spread = 1 / np.sqrt(result.n_pixels[1:] / 2)
    assert (np.abs(result.frc[1:]) < 4 * spread).mean() > 0.98


def test_frc_of_signal_plus_noise_matches_the_snr():
    # a = s + n1, b = s + n2, white, var(s) = var(n): FRC = SNR / (1 + SNR) = 0.5 in every ring.
    rng = np.random.default_rng(2)
    signal, n1, n2 = rng.standard_normal((3, 256, 256))
    result = frc(signal + n1, signal + n2)
    mid = result.frc[20:120]
    print(f"white SNR 1: mean FRC {mid.mean():.4f} (expected 0.5)")
    assert mid.mean() == pytest.approx(0.5, abs=0.02)
    assert frc_auc(result, 1.0) == pytest.approx(0.5, abs=0.02)


def test_resolution_is_the_first_threshold_crossing_of_a_band_limited_signal():
    rng = np.random.default_rng(3)
    shape = (256, 256)
    fy, fx = np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256), indexing="ij")
    passband = np.hypot(fy, fx) < 0.2  # 0.4 of Nyquist
    signal = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * passband).real
    noise = 0.05 * signal.std()
    a, b = (signal + noise * rng.standard_normal(shape) for _ in range(2))
    result = frc(a, b)
    res_half_bit = frc_resolution(result, HALF_BIT)
    res_paper = frc_resolution(result, 0.1)
    print(f"band limit 0.4 Nyquist: resolution 1/2-bit {res_half_bit:.4f}, "
          f"SNRt 0.1 {res_paper:.4f}")
    assert res_half_bit == pytest.approx(0.4, abs=0.01)
    assert res_paper == pytest.approx(0.4, abs=0.01)
    assert frc_resolution(frc(signal, signal)) == 1.0  # never crosses


def _synthetic_curve(values) -> FRCResult:
    """An FRCResult with the given FRC per ring, rings of a 64-px image (n ~ 2 pi k pixels)."""
    values = np.asarray(values, dtype=float)
    k = np.arange(len(values))
    return FRCResult(freq=k / (len(values) - 1), frc=values,
                     n_pixels=np.maximum(np.round(2 * np.pi * k), 1).astype(int))


def _falling_curve(n_rings=33, edge=0.5, width=0.05):
    """A clean FRC: 1 at low frequency, a smooth fall through 0.5 at ``edge`` of Nyquist."""
    freq = np.arange(n_rings) / (n_rings - 1)
    return 1 / (1 + np.exp((freq - edge) / width))


def test_resolution_skips_a_single_spurious_dip_near_zero_frequency():
    clean = _falling_curve()
    dipped = clean.copy()
    dipped[2] = 0.0  # one ring near DC with no correlation (little power, noise)
    clean_result, dipped_result = _synthetic_curve(clean), _synthetic_curve(dipped)
    threshold = frc_threshold(dipped_result, HALF_BIT)
    assert dipped[2] < threshold[2] and np.all(dipped[3:12] > threshold[3:12])
    resolution = frc_resolution(dipped_result, HALF_BIT)
    print(f"one dip at ring 2: resolution {resolution:.4f}, clean "
          f"{frc_resolution(clean_result, HALF_BIT):.4f}, first crossing "
          f"{frc_resolution(dipped_result, HALF_BIT, sustain=1):.4f}")
    assert resolution == frc_resolution(clean_result, HALF_BIT)
    assert 0.5 < resolution < 0.75  # where the smooth fall meets the threshold (~0.55-0.6)
    # The old rule, any first crossing, reports the dip: ring 2 of 32, 1/16 of Nyquist.
    assert frc_resolution(dipped_result, HALF_BIT, sustain=1) < 2 / 32
    # A dip of SUSTAINED_RINGS - 1 rings is still skipped; SUSTAINED_RINGS rings set it.
    assert SUSTAINED_RINGS == 3
    two = clean.copy()
    two[2:4] = 0.0
    assert frc_resolution(_synthetic_curve(two), HALF_BIT) == resolution
    three = clean.copy()
    three[2:5] = 0.0
    assert frc_resolution(_synthetic_curve(three), HALF_BIT) < 2 / 32


def test_resolution_of_a_clean_curve_is_unchanged_by_the_sustained_rule():
    result = _synthetic_curve(_falling_curve())
    margin = result.frc - frc_threshold(result, HALF_BIT)
    k = int(np.flatnonzero(margin[1:] < 0)[0]) + 1  # the first crossing, by hand
    expected = result.freq[k - 1] + margin[k - 1] / (margin[k - 1] - margin[k]) * (
        result.freq[k] - result.freq[k - 1])
    for sustain in (1, 2, SUSTAINED_RINGS, 10):
        assert frc_resolution(result, HALF_BIT, sustain=sustain) == pytest.approx(expected)


def test_resolution_is_nyquist_for_a_curve_that_never_crosses():
    assert frc_resolution(_synthetic_curve(np.full(33, 0.9)), HALF_BIT) == 1.0
    # Dips shorter than the sustain count before Nyquist do not count either ...
    curve = np.full(33, 0.9)
    curve[[5, 6, 20]] = -0.1
    assert frc_resolution(_synthetic_curve(curve), HALF_BIT) == 1.0
    # ... but a fall in the last rings counts: fewer than 3 remain, all below.
    curve[-2:] = -0.1
    assert 30 / 32 < frc_resolution(_synthetic_curve(curve), HALF_BIT) < 31 / 32
    with pytest.raises(InvalidInputError, match="sustain"):
        frc_resolution(_synthetic_curve(curve), HALF_BIT, sustain=0)


def test_threshold_curves_follow_van_heel_and_schatz():
    result = frc(_smooth(), _smooth(seed=1))
    n = result.n_pixels[10]
    # Hand-evaluated coefficients: 2 sqrt(0.2071) + 1 = 1.9102, 2 sqrt(0.2071) = 0.9102.
    expected = (0.2071 + 1.9102 / np.sqrt(n)) / (1.2071 + 0.9102 / np.sqrt(n))
    assert frc_threshold(result, HALF_BIT)[10] == pytest.approx(expected, rel=1e-4)
    root = np.sqrt(n)
    expected_01 = (0.1 + (2 * np.sqrt(0.1) + 1) / root) / (1.1 + 2 * np.sqrt(0.1) / root)
    assert frc_threshold(result, 0.1)[10] == pytest.approx(expected_01, rel=1e-12)
    assert frc_threshold(result, 0.1)[10] < frc_threshold(result, HALF_BIT)[10]
    # One pixel: threshold 1; many pixels: SNRt / (1 + SNRt) = 0.1716 for 1/2 bit.
    assert frc_threshold(result, HALF_BIT)[0] == pytest.approx(1.0)
    big = type(result)(freq=np.zeros(1), frc=np.zeros(1), n_pixels=np.array([10**12]))
    assert frc_threshold(big, HALF_BIT)[0] == pytest.approx(0.2071 / 1.2071, rel=1e-5)


def test_frc_auc_cutoff_is_required_and_labelled():
    img = _smooth()
    noisy = img + 0.5 * np.random.default_rng(2).standard_normal(img.shape)
    result = frc(noisy, img)
    auc_half, auc_full = frc_auc(result, 0.5), frc_auc(result, 1.0)
    print(f"smooth image + noise: FRC-AUC(0.5) {auc_half:.3f}, FRC-AUC(1.0) {auc_full:.3f}")
    assert auc_half > auc_full + 0.2  # a smooth image: the high frequencies are noise
    with pytest.raises(TypeError):
        frc_auc(result)  # no default cutoff on purpose
    with pytest.raises(InvalidInputError, match="cutoff"):
        frc_auc(result, 2.0)
    assert frc_auc_key(0.5) == "frc_auc_0.5"
    assert frc_auc_key(1, "phase") == "frc_auc_1.0_phase"
    scores = compare_objects(np.exp(1j * noisy), np.exp(1j * img), taper_px=10)
    assert {"frc_auc_0.5_phase", "frc_auc_1.0_phase", "frc_auc_0.5_amplitude",
            "frc_auc_1.0_amplitude"} <= set(scores)
    assert not any(k.startswith("frc_auc") and k.count("_") < 3 for k in scores)


# --- preprocessing --------------------------------------------------------------------------


def test_global_phase_offset_is_removed():
    truth = _object()
    aligned = align_global_phase(truth * np.exp(2.5j), truth)
    assert np.abs(aligned - truth).max() < 1e-12


@pytest.mark.parametrize("slopes", [(0.07, -0.05), (0.9, 1.7)])  # gentle, and 30+ wraps
def test_phase_ramp_and_offset_are_removed_exactly(slopes):
    truth = _object(seed=3)
    yy, xx = np.indices(truth.shape)
    ramp = np.exp(1j * (2.0 + slopes[0] * yy + slopes[1] * xx))
    flattened = remove_phase_plane(truth * ramp, truth)
    err = np.abs(np.angle(flattened * np.conj(truth))).max()
    print(f"slopes {slopes} rad/px: max phase error after plane removal {err:.2e} rad")
    assert err < 1e-5
    a0, ay, ax = fit_phase_plane(truth * ramp, truth)
    assert (a0, ay, ax) == pytest.approx((-2.0, -slopes[0], -slopes[1]), abs=1e-8)


def test_phase_plane_fit_ignores_pixels_without_weight():
    truth = _object(seed=4)
    yy, xx = np.indices(truth.shape)
    recon = truth * np.exp(1j * (0.4 + 0.03 * yy - 0.02 * xx))
    recon[:, :30] = np.exp(1j * np.random.default_rng(5).uniform(-np.pi, np.pi, (128, 30)))
    weights = np.ones(truth.shape)
    weights[:, :30] = 0  # e.g. outside the scanned area
    flat = remove_phase_plane(recon, truth, weights=weights)
    assert np.abs(np.angle(flat[:, 30:] * np.conj(truth[:, 30:]))).max() < 1e-5


@pytest.mark.parametrize("shift", [(3.3, -1.7), (-0.45, 5.62)])
def test_known_subpixel_shift_is_recovered(shift):
    img = _smooth(seed=4, sigma=2)
    dy, dx = register_shift(apply_shift(img, shift), img)
    print(f"applied {shift}, found ({dy:.3f}, {dx:.3f})")
    assert abs(dy - shift[0]) < 0.05 and abs(dx - shift[1]) < 0.05
    # A pure phase object (no amplitude contrast) registers on the complex field.
    obj = np.exp(1j * _smooth(seed=5, sigma=2))
    dy, dx = register_shift(apply_shift(obj, shift), obj, upsample=50)
    assert abs(dy - shift[0]) < 0.05 and abs(dx - shift[1]) < 0.05
    back = apply_shift(apply_shift(obj, shift), (-shift[0], -shift[1]))
    assert np.abs(back - obj).max() < 1e-10


def test_tukey_taper_has_the_requested_edge_width():
    window = tukey_taper((100, 80), 20)
    assert window.shape == (100, 80)
    assert window[0].max() == 0 and window[:, 0].max() == 0
    assert np.all(window[20:80, 20:60] == 1)  # flat inside the 20 px edges
    assert 0 < window[10, 40] < 1 and np.all(np.diff(window[:21, 40]) >= 0)
    assert np.all(tukey_taper((16, 16), 0) == 1)
    np.testing.assert_allclose(tukey_taper((9, 9), 100)[4], np.hanning(9), atol=1e-12)


def test_crop_edges():
    img = np.arange(120.0).reshape(10, 12)
    cropped = crop_edges(img, 2)
    assert cropped.shape == (6, 8) and cropped[0, 0] == img[2, 2]
    with pytest.raises(InvalidInputError, match="leaves nothing"):
        crop_edges(img, 5)


# --- PSNR, SSIM, NRMSE ----------------------------------------------------------------------


def test_psnr_matches_a_hand_computation():
    ref = np.linspace(0, 1, 100).reshape(10, 10)  # range 1
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    img = ref.copy()
    img[0, 0] += 1.0  # MSE = 1 / 100
    assert psnr(img, ref, data_range=2.0) == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(ref, ref) == np.inf


def _ssim_brute_force(x, y, data_range, sigma=1.5, radius=5):
    """SSIM from its definition: explicit 11 x 11 Gaussian weights at every interior pixel."""
    g = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(radius, x.shape[0] - radius):
        for j in range(radius, x.shape[1] - radius):
            px = x[i - radius:i + radius + 1, j - radius:j + radius + 1]
            py = y[i - radius:i + radius + 1, j - radius:j + radius + 1]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cxy + c2)
                          / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_its_definition_and_falls_with_noise():
    big = _smooth(seed=5)
    assert ssim(big, big) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(6)
    small = _smooth((40, 36), seed=7)
    noisy = small + 0.3 * rng.standard_normal(small.shape)
    assert ssim(noisy, small) == pytest.approx(_ssim_brute_force(noisy, small, np.ptp(small)),
                                               rel=1e-10)
    values = [ssim(big + s * rng.standard_normal(big.shape), big) for s in (0.05, 0.2, 1.0)]
    print(f"SSIM at noise 0.05 / 0.2 / 1.0 of the std: {np.round(values, 3).tolist()}")
    assert 1 > values[0] > values[1] > values[2]
    assert ssim(big + 0.2, big, data_range=100) > ssim(big + 0.2, big, data_range=1)


def test_nrmse_removes_global_phase_and_optionally_scale():
    truth = _object(seed=7)
    assert nrmse(2 * truth * np.exp(1.2j), truth) < 1e-12
    assert nrmse(truth * np.exp(1.2j), truth, fit_scale=False) < 1e-12
    assert nrmse(2 * truth, truth, fit_scale=False) == pytest.approx(1.0)
    wrong = truth * np.exp(0.3j * _smooth(seed=8))
    err = nrmse(wrong, truth)
    # Small phase errors e: NRMSE ~ rms(e - mean e) (weighted by the amplitude).
    assert err == pytest.approx(0.3, rel=0.1)
    mask = np.zeros(truth.shape, bool)
    mask[:, :64] = True
    half = truth.copy()
    half[:, 64:] = 0
    assert nrmse(half, truth, mask) < 1e-12 and nrmse(half, truth) > 0.5


# --- compare_objects ------------------------------------------------------------------------


def test_compare_objects_undoes_offset_ramp_and_shift():
    truth = _object((160, 160), seed=9, sigma=1.0)  # broad band: every ring carries signal
    yy, xx = np.indices(truth.shape)
    recon = apply_shift(truth, (2.43, -1.31)) * np.exp(1j * (1.1 + 0.02 * yy - 0.03 * xx))
    scores = compare_objects(recon, truth, crop=8, taper_px=20)  # registers by default
    unregistered = compare_objects(recon, truth, crop=8, register=False)
    print("registered:", scores["shift"], {k: round(v, 4) for k, v in scores.items()
                                          if isinstance(v, float)})
    print("unregistered:", {k: round(v, 4) for k, v in unregistered.items()
                            if isinstance(v, float)})
    assert scores["shift"] == pytest.approx((-2.43, 1.31), abs=0.01)
    for key in ("frc_auc_0.5_phase", "frc_auc_1.0_phase", "frc_auc_0.5_amplitude",
                "frc_auc_1.0_amplitude", "ssim_phase", "ssim_amplitude"):
        assert scores[key] > 0.99, key
    assert scores["psnr_phase"] > 60 and scores["nrmse"] < 0.005
    assert scores["recon"].shape == scores["truth"].shape == (144, 144)
    assert unregistered["frc_auc_0.5_phase"] < 0.3 and unregistered["nrmse"] > 0.5
    assert unregistered["shift"] == (0.0, 0.0)
    # The result says whether it registered, and by how much.
    assert scores["registered"] and scores["settings"]["registered"]
    assert scores["settings"]["shift"] == scores["shift"]
    assert scores["settings"]["crop_applied"] == 8  # the 2.4-px wrap is inside the 8-px crop
    assert not unregistered["registered"] and unregistered["settings"]["shift"] == (0.0, 0.0)


def test_compare_objects_crops_what_the_registration_wrapped():
    truth = _object((128, 128), seed=13, sigma=1.5)
    recon = np.roll(truth, (3, -5), axis=(0, 1))  # a whole-pixel shift, as blind PIE may leave
    scores = compare_objects(recon, truth, taper_px=8)
    assert scores["shift"] == pytest.approx((-3, 5), abs=0.01)
    assert scores["settings"]["crop"] == 0 and scores["settings"]["crop_applied"] == 5
    assert scores["recon"].shape == (118, 118)
    # Nothing wrapped is scored: the registered, cropped recon is the truth.
    assert scores["frc_auc_0.5_phase"] > 0.999 and scores["nrmse"] < 1e-6
    unregistered = compare_objects(recon, truth, taper_px=8, register=False)
    print(f"shifted by (3, -5) px: FRC-AUC(0.5) phase {scores['frc_auc_0.5_phase']:.3f} "
          f"registered, {unregistered['frc_auc_0.5_phase']:.3f} not")
    assert unregistered["frc_auc_0.5_phase"] < 0.5


def test_compare_objects_scores_noise_and_reports_curves():
    truth = _object(seed=10)
    rng = np.random.default_rng(11)
    noise = 0.05 * (rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape))
    scores = compare_objects(truth + noise, truth, crop=4)
    print(f"noisy recon: FRC-AUC(0.5) phase {scores['frc_auc_0.5_phase']:.3f}, "
          f"FRC-AUC(1.0) phase {scores['frc_auc_1.0_phase']:.3f}, "
          f"PSNR phase {scores['psnr_phase']:.2f} dB, SSIM phase {scores['ssim_phase']:.3f}")
    # A smooth object: the noise takes over the high rings, so the 1.0 cutoff scores lower.
    assert 0 < scores["frc_auc_1.0_phase"] < scores["frc_auc_0.5_phase"] < 1
    # Phase noise of complex noise 0.05 per component on amplitude ~1 is about 0.05 rad rms.
    phase_range = np.ptp(np.angle(scores["truth"]))
    assert scores["psnr_phase"] == pytest.approx(20 * np.log10(phase_range / 0.05), abs=1.0)
    assert 0 < scores["ssim_phase"] < 1 and 0 < scores["ssim_amplitude"] < 1
    assert len(scores["threshold"]) == len(scores["frc_phase"].freq) == 61
    assert scores["settings"]["taper_px"] == 20 and scores["settings"]["remove_phase_plane"]


def test_compare_objects_marks_a_constant_part_undefined():
    phase_only = np.exp(1j * _smooth(seed=12))
    scores = compare_objects(phase_only, phase_only, taper_px=8)
    assert scores["frc_auc_0.5_phase"] == pytest.approx(1.0)
    assert np.isnan(scores["frc_auc_0.5_amplitude"]) and np.isnan(scores["psnr_amplitude"])


# --- invalid input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: frc(np.zeros((8, 8)), np.zeros((8, 9))), r"one shape, got \(8, 8\) and \(8, 9\)"),
        (lambda: frc(np.zeros((8, 8)), np.full((8, 8), np.nan)), "image2: contains NaN"),
        (lambda: frc(np.zeros(8), np.zeros(8)), "expected a 2-D image, got .* shape \\(8,\\)"),
        (lambda: psnr(np.zeros((8, 8), complex), np.zeros((8, 8))), "np.abs or np.angle"),
        (lambda: psnr(np.ones((8, 8)), np.ones((8, 8))), "reference is constant"),
        (lambda: ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8))), "2-D"),
        (lambda: ssim(np.eye(8), np.eye(8)), "both sides > 10"),
        (lambda: register_shift(np.eye(8), np.eye(8)[:7]), "one shape"),
        (lambda: register_shift(np.eye(8), np.eye(8), upsample=0), "upsample"),
        (lambda: apply_shift(np.eye(8), (1.0,)), "two finite numbers"),
        (lambda: remove_phase_plane(np.eye(8), np.eye(8), weights=-np.ones((8, 8))),
         "non-negative"),
        (lambda: compare_objects(np.eye(8), np.eye(9)), "recon and truth"),
        (lambda: compare_objects(np.eye(8), np.full((8, 8), np.inf)), "truth: contains NaN or inf"),
        (lambda: tukey_taper((8, 8), -1), "width_px"),
        (lambda: nrmse(np.eye(8), np.eye(8), mask=np.ones((8, 8))), "bool"),
    ],
)
def test_invalid_input_is_a_clear_error(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()


def test_registration_ignores_the_zero_border_of_a_stitched_reconstruction():
    """A stitched reconstruction is zero where nothing was measured; that edge must not be
    aligned with the truth's structure (it once gave a 69-px 'shift' and FRC-AUC ~0)."""
    from bluesky_ptychopinn.synthetic import make_object

    truth = make_object("cells", (192, 192), seed=1)
    recon = np.roll(truth, (1, -2), axis=(0, 1)) * np.exp(0.4j)
    recon[:36], recon[-36:], recon[:, :36], recon[:, -36:] = 0, 0, 0, 0
    scores = compare_objects(recon, truth, crop=40)
    assert np.allclose(scores["shift"], (-1, 2), atol=0.1)  # applied to recon
    assert scores["frc_auc_0.5_phase"] > 0.95


# --- review of 2026-12-02: the absolute phase, zero pixels, constant parts -----------------


def _textured(seed: int = 1, n: int = 128):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    phase = ndimage.gaussian_filter(rng.standard_normal((n, n)), 3) * 8  # ~ +-1 rad
    amplitude = 1 + 0.2 * ndimage.gaussian_filter(rng.standard_normal((n, n)), 3)
    noise = np.exp(1j * 0.05 * rng.standard_normal((n, n)))
    return amplitude, phase, noise


def test_scores_do_not_depend_on_the_truths_absolute_phase():
    """The same error scores the same whether the truth's phase sits around 0 or around pi
    (where np.angle wraps): the absolute phase of an object is arbitrary."""
    amplitude, phase, noise = _textured()
    scores = []
    for offset in (0.0, np.pi, -2.0):
        truth = amplitude * np.exp(1j * (phase + offset))
        scores.append(compare_objects(truth * noise, truth, register=False, taper_px=8))
    for key in ("frc_auc_0.5_phase", "psnr_phase", "ssim_phase", "resolution_phase"):
        values = [s[key] for s in scores]
        assert max(values) - min(values) < 1e-6 * max(1.0, abs(values[0])), (key, values)


def test_unreconstructed_pixels_keep_phase_zero_through_the_alignment():
    from bluesky_ptychopinn.metrics import align_global_phase, remove_phase_plane

    amplitude, phase, _ = _textured(n=64)
    truth = amplitude * np.exp(1j * phase)
    yy, xx = np.mgrid[:64, :64]
    recon = truth * np.exp(1j * (2.5 + 0.4 * yy + 0.3 * xx))
    recon[20:30] = 0  # an unscanned band
    for aligned in (remove_phase_plane(recon, truth), align_global_phase(recon, truth)):
        assert (np.angle(aligned[20:30]) == 0).all()  # no signed zero (angle pi)


def test_a_constant_part_scores_nan_whatever_the_dtype_and_registration():
    from scipy.ndimage import fourier_shift

    _, phase, _ = _textured(n=96)
    truth = np.exp(1j * phase).astype(np.complex64)  # |truth| = 1 +- 1e-7: no amplitude
    shifted = np.fft.ifft2(fourier_shift(np.fft.fft2(truth), (0.5, 0.3))).astype(np.complex64)
    for recon, register in ((truth * 0.9, False), (shifted, True)):
        scores = compare_objects(recon, truth, register=register, taper_px=8)
        assert np.isnan(scores["frc_auc_0.5_amplitude"]) and np.isnan(scores["psnr_amplitude"])
        assert np.isfinite(scores["frc_auc_0.5_phase"])
