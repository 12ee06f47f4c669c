"""Synthetic object classes, samples and power spectra (bluesky_ptychopinn.synthetic)."""

from __future__ import annotations

import inspect
import itertools
import math
import time

import matplotlib.image
import numpy as np
import pytest
from scipy import ndimage

from bluesky_ptychopinn.errors import FileFormatError, InvalidInputError
from bluesky_ptychopinn.synthetic import (
    OBJECT_CLASSES,
    SAMPLES,
    blurred_white_noise,
    cells,
    dead_leaves,
    fractal_noise,
    from_image,
    make_object,
    procedural,
    quadrant_features,
    radial_power_spectrum,
    siemens_star,
    simplex_noise,
    spectral_slope,
    test_chip,
)
from bluesky_ptychopinn.synthetic._dead_leaves import _paint_labels, power_law_radii

ALL_NAMES = OBJECT_CLASSES + SAMPLES
TOL = 1e-5  # complex64 rounding of amplitude and phase


# ---------------------------------------------------------------- every generator


@pytest.mark.parametrize("name", ALL_NAMES)
def test_dtype_shape_and_finite_on_a_non_square_canvas(name):
    obj = make_object(name, (48, 80), seed=3)
    assert obj.dtype == np.complex64
    assert obj.shape == (48, 80)
    assert np.isfinite(obj).all()
    assert np.abs(obj).min() > 0  # a transmission function never blocks completely


@pytest.mark.parametrize("name", ALL_NAMES)
def test_same_seed_same_object_different_seed_different_object(name):
    a = make_object(name, (64, 64), seed=11)
    b = make_object(name, (64, 64), seed=11)
    np.testing.assert_array_equal(a, b)
    c = make_object(name, (64, 64), seed=12)
    if name == "siemens_star":  # no randomness at all: the seed is ignored
        np.testing.assert_array_equal(a, c)
    else:
        assert np.abs(a - c).mean() > 1e-3


def test_a_generator_seed_is_drawn_from_not_reset():
    rng = np.random.default_rng(5)
    first = dead_leaves(64, seed=rng, n_shapes=50)
    second = dead_leaves(64, seed=rng, n_shapes=50)
    assert np.abs(first - second).mean() > 1e-3
    np.testing.assert_array_equal(
        first, dead_leaves(64, seed=np.random.default_rng(5), n_shapes=50)
    )


@pytest.mark.parametrize("name", OBJECT_CLASSES)
def test_amplitude_and_phase_fill_the_requested_ranges(name):
    amp_range, phase_range = (0.5, 0.9), (-1.0, 2.0)
    obj = make_object(name, (96, 96), seed=4, amp_range=amp_range, phase_range=phase_range)
    amp, phase = np.abs(obj), np.angle(obj)
    # Min-max rescaling: the ranges are reached exactly at both ends.
    assert amp.min() == pytest.approx(amp_range[0], abs=TOL)
    assert amp.max() == pytest.approx(amp_range[1], abs=TOL)
    assert phase.min() == pytest.approx(phase_range[0], abs=TOL)
    assert phase.max() == pytest.approx(phase_range[1], abs=TOL)


@pytest.mark.parametrize(
    ("name", "amp_range"),
    [
        ("dead_leaves", (0.6, 1.1)),
        ("blurred_white_noise", (0.8, 1.2)),
        ("procedural", (0.8, 1.2)),
        ("simplex", (0.8, 1.2)),
    ],
)
def test_paper_default_ranges(name, amp_range):
    obj = make_object(name, (96, 96), seed=1)
    amp, phase = np.abs(obj), np.angle(obj)
    assert amp_range[0] - TOL <= amp.min() and amp.max() <= amp_range[1] + TOL
    assert np.ptp(amp) == pytest.approx(amp_range[1] - amp_range[0], abs=TOL)
    assert -math.pi - TOL <= phase.min() and phase.max() <= math.pi + TOL


@pytest.mark.parametrize("name", ["blurred_white_noise", "procedural", "simplex"])
def test_amplitude_and_phase_are_fully_correlated_as_in_the_paper(name):
    # amplitude = 1.2 - 0.4 b and phase = -pi + 2 pi b: phase is an exact function of amplitude.
    # phase_range (-3, 3) keeps np.angle away from its +-pi wrap.
    obj = make_object(name, (64, 64), seed=2, phase_range=(-3.0, 3.0))
    b = (1.2 - np.abs(obj)) / 0.4
    np.testing.assert_allclose(np.angle(obj), -3.0 + 6.0 * b, atol=1e-5)


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_have_modest_contrast_and_empty_regions_at_unit_transmission(name):
    obj = make_object(name, (128, 128), seed=0)
    amp, phase = np.abs(obj), np.angle(obj)
    assert 0.8 - TOL <= amp.min() and amp.max() <= 1.0 + TOL
    assert -0.5 - TOL <= phase.min() and phase.max() <= 0.0 + TOL
    assert amp[0, 0] == pytest.approx(1.0, abs=TOL)  # corners are empty
    assert phase[0, 0] == pytest.approx(0.0, abs=TOL)
    assert np.ptp(amp) > 0.1  # there is something to see


# ---------------------------------------------------------------- dead leaves


def test_dead_leaves_radii_follow_the_requested_power_law():
    radii = power_law_radii(np.random.default_rng(0), 200_000, 0.03, 0.2, 3.0)
    assert radii.min() >= 0.03 and radii.max() <= 0.2
    counts, edges = np.histogram(radii, bins=np.geomspace(0.03, 0.2, 13))
    density = counts / np.diff(edges)
    centres = np.sqrt(edges[1:] * edges[:-1])
    slope = np.polyfit(np.log(centres), np.log(density), 1)[0]
    print(f"fitted size-density exponent: {slope:.3f} (requested -3)")
    assert slope == pytest.approx(-3.0, abs=0.05)


def test_dead_leaves_shapes_are_rasterised_with_their_true_area():
    rng = np.random.default_rng(0)
    centre, r = np.array([[100.0, 100.0]]), np.array([40.0])
    areas = {
        kind: int((_paint_labels((200, 200), centre, r, [kind], rng) == 0).sum())
        for kind in ("circle", "square")
    }
    print(f"rasterised areas: {areas}")
    assert areas["circle"] == pytest.approx(math.pi * 40**2, rel=0.01)
    assert areas["square"] == pytest.approx(2 * 40**2, rel=0.02)  # circumradius r: side r sqrt 2


def test_dead_leaves_is_piecewise_constant_with_one_value_per_visible_shape():
    obj = dead_leaves(128, seed=0, n_shapes=40)
    n_values = np.unique(np.abs(obj)).size
    assert 2 <= n_values <= 41  # 40 shapes + the empty background, occluded shapes vanish
    # Later shapes occlude earlier ones: more shapes, no more distinct values than shapes + 1.
    assert np.unique(np.abs(dead_leaves(128, seed=0, n_shapes=5))).size <= 6


# ---------------------------------------------------------------- noise classes


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_blurred_white_noise_spectrum_is_the_gaussian_of_its_sigma(sigma):
    # White noise blurred by G_sigma has power ~ exp(-(2 pi sigma f)^2): fit log P vs f^2.
    estimates = []
    for seed in range(3):
        obj = blurred_white_noise(256, seed=seed, sigma=sigma)
        freq, power = radial_power_spectrum(np.abs(obj), window=False)  # periodic: no window
        band = (freq >= 0.02) & (freq <= min(0.15, 0.5 / sigma))
        curvature = np.polyfit(freq[band] ** 2, np.log(power[band]), 1)[0]
        estimates.append(math.sqrt(-curvature) / (2 * math.pi))
    print(f"sigma {sigma}: estimated from spectra {np.round(estimates, 3)}")
    assert np.mean(estimates) == pytest.approx(sigma, rel=0.05)


def test_blurred_white_noise_draws_sigma_from_its_range_when_not_given():
    smooth = blurred_white_noise(128, seed=0, sigma_range=(3.0, 3.0))
    rough = blurred_white_noise(128, seed=0, sigma_range=(1.0, 1.0))
    assert spectral_slope(np.abs(smooth), fmin=0.1, fmax=0.3) < spectral_slope(
        np.abs(rough), fmin=0.1, fmax=0.3
    )


def test_simplex_512_takes_well_under_a_second():
    simplex_noise(64, seed=0, octaves=7)  # warm-up (imports, allocator)
    start = time.perf_counter()
    obj = simplex_noise((512, 512), seed=0, octaves=7)
    elapsed = time.perf_counter() - start
    print(f"simplex_noise 512x512, 7 octaves: {elapsed * 1e3:.1f} ms")
    assert obj.shape == (512, 512)
    assert elapsed < 1.0


def test_more_octaves_add_fine_detail():
    def high_fraction(octaves: int) -> float:
        freq, power = radial_power_spectrum(fractal_noise(256, seed=0, octaves=octaves))
        return power[freq > 0.1].sum() / power.sum()

    few, many = high_fraction(3), high_fraction(7)
    print(f"power fraction above 0.1 cycles/px: 3 octaves {few:.2e}, 7 octaves {many:.2e}")
    assert many > 10 * few


def test_paper_parameters_are_exposed_with_the_paper_defaults():
    def defaults(func):
        return {k: p.default for k, p in inspect.signature(func).parameters.items()}

    dl = defaults(dead_leaves)
    assert (dl["n_shapes"], dl["rmin"], dl["rmax"], dl["power"]) == (500, 0.03, 0.2, 3.0)
    assert (dl["beta_scale"], dl["delta_ratio"], dl["thickness"]) == (1e-3, (100.0, 10.0), 3.0)
    assert dl["amp_range"] == (0.6, 1.1) and dl["phase_range"] == (-math.pi, math.pi)
    assert defaults(blurred_white_noise)["sigma_range"] == (1.0, 3.0)
    sn = defaults(simplex_noise)
    assert sn["octave_range"] == (3, 7) and sn["persistence"] == 0.5
    assert defaults(procedural)["noise_weight_range"] == (0.3, 0.4)
    for func in (blurred_white_noise, simplex_noise, procedural):
        assert defaults(func)["amp_range"] == (0.8, 1.2)  # amplitude = 1.2 - 0.4 b
        assert defaults(func)["phase_range"] == (-math.pi, math.pi)


def test_procedural_mixes_features_and_noise_at_the_requested_weight():
    # A given noise_weight draws nothing, so w = 0 and w = 1 expose the two ingredients F and N
    # of the same seed; any w must give b = normalise((1 - w) F + w N).
    def base(w: float) -> np.ndarray:
        return (1.2 - np.abs(procedural(96, seed=7, noise_weight=w)).astype(np.float64)) / 0.4

    features, noise, mixed = base(0.0), base(1.0), base(0.35)
    expected = 0.65 * features + 0.35 * noise
    expected = (expected - expected.min()) / np.ptp(expected)
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    assert np.corrcoef(features.ravel(), noise.ravel())[0, 1] < 0.5  # two different maps


# ---------------------------------------------------------------- from_image


def test_from_image_maps_brightness_linearly():
    img = np.arange(12.0).reshape(3, 4)
    obj = from_image(img, amp_range=(0.6, 1.0), phase_range=(-1.0, 1.0))
    b = img / 11.0
    np.testing.assert_allclose(np.abs(obj), 0.6 + 0.4 * b, atol=TOL)
    np.testing.assert_allclose(np.angle(obj), -1.0 + 2.0 * b, atol=TOL)


def test_from_image_modes():
    img = np.random.default_rng(0).uniform(size=(16, 16))
    phase_only = from_image(img, mode="phase")
    np.testing.assert_allclose(np.abs(phase_only), 1.0, atol=TOL)
    assert np.angle(phase_only).min() == pytest.approx(-math.pi / 2, abs=TOL)
    amplitude_only = from_image(img, mode="amplitude")
    np.testing.assert_allclose(np.angle(amplitude_only), 0.0, atol=TOL)
    assert np.abs(amplitude_only).min() == pytest.approx(0.6, abs=TOL)


def test_from_image_rgb_uses_luminance():
    rgb = np.zeros((4, 4, 3))
    rgb[..., 1] = np.linspace(0, 1, 16).reshape(4, 4)  # green only
    rgb[0, 0] = [1.0, 0.0, 0.0]  # pure red is darker than half-green in luminance
    obj = from_image(rgb, mode="amplitude", amp_range=(0.0, 1.0))
    luma = 0.7152 * rgb[..., 1]
    luma[0, 0] = 0.2126
    np.testing.assert_allclose(np.abs(obj), (luma - luma.min()) / np.ptp(luma), atol=TOL)


def test_from_image_reads_npy_and_png_files(tmp_path):
    img = np.outer(np.linspace(0, 1, 20), np.ones(30))
    np.save(tmp_path / "img.npy", img)
    from_npy = from_image(tmp_path / "img.npy", mode="phase", phase_range=(0.0, 1.0))
    np.testing.assert_allclose(np.angle(from_npy), img, atol=TOL)

    matplotlib.image.imsave(tmp_path / "img.png", img, cmap="gray", vmin=0, vmax=1)
    from_png = from_image(str(tmp_path / "img.png"), mode="phase", phase_range=(0.0, 1.0))
    assert from_png.shape == (20, 30)
    np.testing.assert_allclose(np.angle(from_png), img, atol=2 / 255)  # 8-bit colormap quantisation


def test_from_image_resamples_to_a_shape():
    img = np.outer(np.linspace(0, 1, 11), np.ones(11))
    obj = from_image(img, shape=(21, 5), mode="phase", phase_range=(0.0, 1.0))
    assert obj.shape == (21, 5)
    np.testing.assert_allclose(np.angle(obj[:, 0]), np.linspace(0, 1, 21), atol=TOL)


def test_from_image_rejects_bad_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(FileFormatError, match="bad.png"):
        from_image(tmp_path / "bad.png")
    with pytest.raises(InvalidInputError, match="existing file"):
        from_image(tmp_path / "missing.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 5)))
    with pytest.raises(InvalidInputError, match=r"\(2, 3, 5\)"):
        from_image(tmp_path / "cube.npy")


# ---------------------------------------------------------------- samples


def test_siemens_star_has_the_requested_number_of_spokes():
    star = siemens_star(256, n_spokes=24)
    material = 1.0 - np.abs(star)  # 0 empty, 0.2 full
    theta = np.linspace(0, 2 * np.pi, 4000, endpoint=False)
    radius = 0.3 * 256
    ring = ndimage.map_coordinates(
        material, [127.5 + radius * np.sin(theta), 127.5 + radius * np.cos(theta)], order=1
    )
    crossings = np.count_nonzero(np.diff(ring > 0.1, append=ring[0] > 0.1))
    assert crossings == 2 * 24
    assert np.abs(star[127, 0]) == pytest.approx(1.0, abs=TOL)  # outside the star radius


def test_test_chip_has_its_material_levels_and_grating():
    chip = test_chip(256)
    levels = {round(float(v), 4) for v in np.unique(1.0 - np.abs(chip))}
    assert levels == {0.0, 0.11, 0.16, 0.2}  # empty, metal 1, metal 2, pads (0.2 x material)
    material = np.abs(chip) < 1.0 - TOL
    # The grating block (bottom right) alternates material and gaps every pixel at 2 px period.
    row = 1.0 - np.abs(chip[256 - 15 - 51 + 2, 256 - 15 - 51 : 256 - 15 - 51 + 20])
    np.testing.assert_allclose(row, np.tile([0.2, 0.0], 10), atol=TOL)
    assert 0.02 < material.mean() < 0.5


def test_cells_are_separate_particles():
    for n in (5, 20):
        sample = cells(256, n=n)
        _, n_found = ndimage.label(np.abs(sample) < 1.0 - 1e-3)
        assert n_found == n


@pytest.mark.parametrize("quadrant", ["top-left", "top-right", "bottom-left", "bottom-right"])
def test_quadrant_features_structure_only_in_one_quadrant(quadrant):
    obj = quadrant_features((64, 96), quadrant)
    amp = np.abs(obj)
    quadrants = {
        "top-left": amp[:32, :48],
        "top-right": amp[:32, 48:],
        "bottom-left": amp[32:, :48],
        "bottom-right": amp[32:, 48:],
    }
    for name, region in quadrants.items():
        if name == quadrant:
            assert np.ptp(region) > 0.05
        else:
            assert np.ptp(region) == 0.0
            assert region[0, 0] == pytest.approx(1.0, abs=TOL)


# ---------------------------------------------------------------- registry and errors


def test_make_object_aliases_and_spellings():
    np.testing.assert_array_equal(make_object("dl", 64, 3), dead_leaves(64, seed=3))
    np.testing.assert_array_equal(make_object("BWN", 64, 3), blurred_white_noise(64, seed=3))
    np.testing.assert_array_equal(make_object("sn", 64, 3), simplex_noise(64, seed=3))
    np.testing.assert_array_equal(make_object("simplex_noise", 64, 3), simplex_noise(64, seed=3))
    np.testing.assert_array_equal(make_object("Dead-Leaves", 64, 3), dead_leaves(64, seed=3))
    np.testing.assert_array_equal(make_object("pr", 64, 3), procedural(64, seed=3))
    np.testing.assert_array_equal(make_object("test_chip", 64), test_chip(64))  # fixed layout
    np.testing.assert_array_equal(make_object("cells", 64, n=4), cells(64, n=4))
    assert OBJECT_CLASSES == ("dead_leaves", "blurred_white_noise", "procedural", "simplex")


def test_make_object_unknown_name_lists_the_valid_ones():
    with pytest.raises(InvalidInputError) as info:
        make_object("perlin_leaves", 64)
    for name in (*OBJECT_CLASSES, *SAMPLES, "dl", "bwn", "pr", "sn"):
        assert repr(name) in str(info.value)


def test_make_object_unknown_parameter_says_what_is_accepted():
    with pytest.raises(InvalidInputError, match="sigma"):
        make_object("bwn", 64, 0, sigmaa=2.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: dead_leaves(0),
        lambda: dead_leaves((10, -3)),
        lambda: dead_leaves((10, 10, 10)),
        lambda: dead_leaves(32.5),
        lambda: dead_leaves(32, seed=-1),
        lambda: dead_leaves(32, seed="a"),
        lambda: dead_leaves(32, n_shapes=-1),
        lambda: dead_leaves(32, rmin=0.3, rmax=0.2),
        lambda: dead_leaves(32, rmin=0.0),
        lambda: dead_leaves(32, shapes=("circle", "star")),
        lambda: dead_leaves(32, shapes=()),
        lambda: dead_leaves(32, amp_range=(1.1, 0.6)),
        lambda: dead_leaves(32, amp_range=(-0.1, 1.0)),
        lambda: dead_leaves(32, phase_range=(0.0, math.inf)),
        lambda: dead_leaves(32, delta_ratio=(100.0, -1.0)),
        lambda: blurred_white_noise(32, sigma=0.0),
        lambda: blurred_white_noise(32, sigma=float("nan")),
        lambda: simplex_noise(32, octaves=0),
        lambda: simplex_noise(32, persistence=0.0),
        lambda: simplex_noise(32, lacunarity=1.0),
        lambda: simplex_noise(32, base_scale=-4.0),
        lambda: simplex_noise(32, base_scale=0.5),
        lambda: simplex_noise(32, octave_range=(5, 3)),
        lambda: procedural(32, layers=("disks", "stars")),
        lambda: procedural(32, noise_weight=1.5),
        lambda: procedural(32, n_per_layer=(5, 2)),
        lambda: procedural(32, size_range=(0.0, 0.1)),
        lambda: from_image(np.zeros(5)),
        lambda: from_image(np.array([[1.0, np.nan]])),
        lambda: from_image(np.ones((3, 3), dtype=complex)),
        lambda: from_image(np.ones((3, 3)), mode="intensity"),
        lambda: siemens_star(64, n_spokes=1),
        lambda: test_chip(16),
        lambda: cells(64, n=-2),
        lambda: quadrant_features(64, "middle"),
        lambda: make_object(3, 64),
        lambda: radial_power_spectrum(np.zeros((4, 4))),
        lambda: radial_power_spectrum(np.zeros(64)),
        lambda: spectral_slope(np.ones((64, 64)), fmin=0.3, fmax=0.2),
        lambda: spectral_slope(np.ones((64, 64)), fmin=0.1, fmax=0.11),
    ],
)
def test_invalid_arguments_raise_invalid_input_error(call):
    with pytest.raises(InvalidInputError):
        call()


# ---------------------------------------------------------------- spectra


def test_radial_power_spectrum_of_white_noise_is_flat_with_unit_power():
    noise = np.random.default_rng(0).normal(size=(128, 160))
    for window in (False, True):
        freq, power = radial_power_spectrum(noise, window=window)
        assert freq[0] == pytest.approx(1 / 128) and freq[-1] == pytest.approx(0.5)
        assert power.mean() == pytest.approx(1.0, rel=0.05)  # Parseval: variance 1
        assert abs(spectral_slope(noise, window=window)) < 0.15


@pytest.mark.parametrize("exponent", [-2.0, -3.0, -4.0])
def test_spectral_slope_recovers_a_known_power_law(exponent):
    n = 256
    rng = np.random.default_rng(1)
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    f[0, 0] = 1.0
    slopes = []
    for _ in range(3):
        field = np.fft.fft2(rng.normal(size=(n, n))) * f ** (exponent / 2)
        slopes.append(spectral_slope(np.real(np.fft.ifft2(field)), window=False))
    print(f"power law f^{exponent}: measured {np.round(slopes, 3)}")
    assert np.mean(slopes) == pytest.approx(exponent, abs=0.15)


def test_object_classes_have_clearly_different_power_spectra():
    """The paper's Fig. 4 premise: the four classes differ in their power spectra.

    Slopes of log10 power vs log10 frequency of the amplitude (linear in the base map), 256 x 256,
    averaged over seeds 0, 1, 2, in a low band (0.01-0.06 cycles/px) and a high band (0.1-0.4).
    """
    bands = {"low": (0.01, 0.06), "high": (0.1, 0.4)}
    slopes = {name: {} for name in OBJECT_CLASSES}
    for name in OBJECT_CLASSES:
        amps = [np.abs(make_object(name, (256, 256), seed=seed)) for seed in range(3)]
        for band, (fmin, fmax) in bands.items():
            values = [spectral_slope(a, fmin=fmin, fmax=fmax) for a in amps]
            slopes[name][band] = float(np.mean(values))
    for name, s in slopes.items():
        print(f"spectral slope {name:20s} low {s['low']:7.2f}   high {s['high']:7.2f}")
    dl, bwn = slopes["dead_leaves"], slopes["blurred_white_noise"]
    pr, sn = slopes["procedural"], slopes["simplex"]
    # Every pair differs in the low band (coarse structure): by > 0.3 in slope.
    for a, b in itertools.combinations(OBJECT_CLASSES, 2):
        assert abs(slopes[a]["low"] - slopes[b]["low"]) > 0.3, (a, b)
    # BWN is white below its blur cut-off and falls off a (Gaussian) cliff above it ...
    assert abs(bwn["low"]) < 1.0
    assert bwn["high"] < dl["high"] - 3.0
    # ... while dead leaves are one power law over both bands (sharp edges at all scales).
    assert abs(dl["high"] - dl["low"]) < 1.0
    assert -3.5 < dl["low"] < -1.5 and -3.5 < dl["high"] < -1.5
    # Gradient noise with persistence 0.5 has octave variance ~ f^-2 spread over an area ~ f^2
    # of the 2-D spectrum: PSD ~ f^-4, steeper than dead leaves; procedural sits in between.
    assert sn["low"] < dl["low"] - 1.0
    assert sn["low"] < pr["low"] < dl["low"]
