"""Physics core: every convention boundary checked against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import InvalidInputError


def _random_complex(shape, seed=0, dtype=np.complex64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


# --- propagation -------------------------------------------------------------------------------


def test_far_field_matches_explicit_dft_with_dc_at_centre(device):
    n = 16
    wave = _random_complex((n, n), seed=1, dtype=np.complex128)
    # Independent reference: the DFT written as a matrix product, frequencies ordered -n/2..n/2-1.
    k = np.arange(n) - n // 2
    j = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(k, j) / n) / np.sqrt(n)
    expected = dft @ wave @ dft.T
    got = physics.far_field(torch.from_numpy(wave).to(device)).cpu().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)
    # A constant exit wave puts all its power on the DC pixel (N//2, N//2).
    flat = physics.far_field(torch.ones(n, n, dtype=torch.complex128, device=device))
    assert torch.argmax(flat.abs()).item() == (n // 2) * n + n // 2


def test_back_propagate_inverts_far_field(device):
    wave = torch.from_numpy(_random_complex((3, 32, 32), seed=2)).to(device)
    back = physics.back_propagate(physics.far_field(wave))
    assert torch.allclose(back, wave, atol=1e-5)


def test_intensity_obeys_parseval_and_sums_modes(device):
    probe = torch.from_numpy(_random_complex((3, 24, 24), seed=3)).to(device)
    patches = torch.from_numpy(_random_complex((5, 24, 24), seed=4)).to(device)
    intensity = physics.diffraction_intensity(probe, patches)
    assert intensity.shape == (5, 24, 24)
    direct = (probe[None].abs() ** 2 * patches[:, None].abs() ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(intensity.sum(dim=(1, 2)), direct, rtol=1e-5, atol=1e-3)
    # Incoherent modes: the intensity is the sum of each mode's own intensity.
    per_mode = sum(physics.diffraction_intensity(probe[m], patches) for m in range(3))
    torch.testing.assert_close(intensity, per_mode, rtol=1e-5, atol=1e-4)


# --- patch extraction and its adjoint ------------------------------------------------------------


def test_extract_patches_matches_scipy_bilinear_interpolation(device):
    obj = _random_complex((60, 70), seed=5, dtype=np.complex128)
    positions = np.array([[20.0, 30.0], [25.3, 33.71], [40.5, 50.25], [16.0, 16.0]])
    n = 32
    got = physics.extract_patches(
        torch.from_numpy(obj).to(device), torch.from_numpy(positions).to(device), n
    ).cpu().numpy()
    for i, (py, px) in enumerate(positions):
        yy, xx = np.meshgrid(py - n / 2 + np.arange(n), px - n / 2 + np.arange(n), indexing="ij")
        ref = ndimage.map_coordinates(obj.real, [yy, xx], order=1) + 1j * ndimage.map_coordinates(
            obj.imag, [yy, xx], order=1
        )
        np.testing.assert_allclose(got[i], ref, atol=1e-9)


def test_integer_position_extracts_the_exact_window():
    obj = torch.arange(100 * 100, dtype=torch.float32).reshape(100, 100)
    patch = physics.extract_patches(obj, torch.tensor([[50.0, 40.0]]), 16)[0]
    # Centre (50, 40), N = 16: rows 42..57, columns 32..47.
    assert torch.equal(patch, obj[42:58, 32:48])


def test_scatter_is_the_exact_adjoint_of_extract(device):
    rng = np.random.default_rng(6)
    shape = (96, 96)
    n = 32
    positions = torch.from_numpy(rng.uniform(17, 79, size=(40, 2)).astype(np.float32)).to(device)
    x = torch.from_numpy(_random_complex(shape, seed=7)).to(device)
    y = torch.from_numpy(_random_complex((40, n, n), seed=8)).to(device)
    lhs = torch.vdot(physics.extract_patches(x, positions, n).reshape(-1), y.reshape(-1))
    rhs = torch.vdot(x.reshape(-1), physics.scatter_patches(y, positions, shape).reshape(-1))
    rel = abs(complex(lhs) - complex(rhs)) / abs(complex(lhs))
    assert rel < 1e-5, rel  # float32 rounding over ~4e4 terms
    # In float64 the two sides agree to double precision: the adjoint is exact, not approximate.
    lhs = torch.vdot(
        physics.extract_patches(x.to(torch.complex128), positions.double(), n)
        .reshape(-1),
        y.to(torch.complex128).reshape(-1),
    )
    rhs = torch.vdot(
        x.to(torch.complex128).reshape(-1),
        physics.scatter_patches(y.to(torch.complex128), positions.double(), shape).reshape(-1),
    )
    assert abs(complex(lhs) - complex(rhs)) / abs(complex(lhs)) < 1e-12


def test_extract_is_differentiable_and_its_gradient_is_the_adjoint():
    obj = torch.from_numpy(_random_complex((48, 48), seed=9)).requires_grad_(True)
    positions = torch.tensor([[20.2, 21.7], [26.9, 24.1]])
    weights = torch.from_numpy(_random_complex((2, 16, 16), seed=10))
    loss = (physics.extract_patches(obj, positions, 16) * weights.conj()).real.sum()
    loss.backward()
    adjoint = physics.scatter_patches(weights, positions, (48, 48))
    torch.testing.assert_close(obj.grad, adjoint, rtol=1e-5, atol=1e-5)


def test_patch_outside_object_is_a_clear_error():
    obj = torch.zeros(40, 40)
    with pytest.raises(InvalidInputError, match="outside the object"):
        physics.extract_patches(obj, torch.tensor([[5.0, 20.0]]), 16)
    with pytest.raises(InvalidInputError, match=r"\(n, 2\)"):
        physics.extract_patches(obj, torch.tensor([1.0, 2.0, 3.0]), 16)
    with pytest.raises(InvalidInputError, match="non-finite"):
        physics.extract_patches(obj, torch.tensor([[float("nan"), 20.0]]), 16)


# --- geometry and scans ------------------------------------------------------------------------


def test_object_pixel_size_formula():
    # lambda(10 keV) = 0.123984 nm; dx = lambda z / (N p).
    dx = physics.object_pixel_size_m(10_000, 2.0, 75e-6, 128)
    assert dx == pytest.approx(1.23984198e-10 * 2.0 / (128 * 75e-6), rel=1e-12)


def test_stage_pixels_round_trip_and_sign():
    pos_m = np.array([[1e-6, 2e-6], [-3e-6, 0.5e-6]])
    px = physics.stage_to_pixels(pos_m, 1e-8, origin_m=(1e-6, 0), origin_px=(50, 60))
    np.testing.assert_allclose(px[0], [50, 260])
    back = physics.pixels_to_stage(px, 1e-8, origin_m=(1e-6, 0), origin_px=(50, 60))
    np.testing.assert_allclose(back, pos_m, atol=1e-18)
    flipped = physics.stage_to_pixels(pos_m, 1e-8, origin_m=(1e-6, 0), origin_px=(50, 60), sign=-1)
    np.testing.assert_allclose(flipped[0], [50, -140])


@pytest.mark.parametrize("pattern", physics.SCAN_PATTERNS)
def test_scan_patterns_cover_the_extent_at_the_requested_density(pattern):
    extent, step = (10.0, 10.0), 1.0
    pos = physics.scan_pattern(pattern, extent, step=step, seed=0)
    assert pos.ndim == 2 and pos.shape[1] == 2
    assert np.abs(pos).max() <= 5.0 + 0.3
    # Nearest-neighbour distance close to the step (the point of a step parameter).
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = d.min(axis=1)
    assert 0.5 * step < np.median(nn) < 1.5 * step, np.median(nn)
    # About one point per step^2 over the scanned area (ellipse for the round patterns).
    area = 100.0 if pattern.endswith("raster") else np.pi * 25
    assert 0.7 < len(pos) / area < 1.5


def test_overlap_sets_the_step():
    a = physics.scan_pattern("raster", 4.0, overlap=0.5, probe_diameter=2.0)
    b = physics.scan_pattern("raster", 4.0, step=1.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidInputError):
        physics.scan_pattern("raster", 4.0, step=1.0, overlap=0.5, probe_diameter=2.0)
    with pytest.raises(InvalidInputError, match="unknown"):
        physics.scan_pattern("zigzag", 4.0, step=1.0)


# --- probes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: physics.zone_plate_probe(64, 20e-9, 10_000, defocus_m=15e-6),
        lambda: physics.airy_probe(64, 20e-9, 10_000),
        lambda: physics.pinhole_probe(64, 20e-9, 10_000, propagation_m=50e-6),
        lambda: physics.kb_probe(64, 20e-9, 10_000),
        lambda: physics.mixed_state_probe(physics.airy_probe(64, 20e-9, 10_000), 3),
    ],
    ids=["zone_plate", "airy", "pinhole", "kb", "mixed"],
)
def test_probe_models_are_unit_norm_centred_and_fit_the_window(make):
    probe = make()
    assert probe.dtype == np.complex64 and probe.ndim == 3 and probe.shape[-1] == 64
    assert float((np.abs(probe) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    intensity = (np.abs(probe) ** 2).sum(0)
    cy, cx = ndimage.center_of_mass(intensity)
    assert abs(cy - 32) < 4 and abs(cx - 32) < 4
    assert physics.probe_diameter_px(probe) < 40


@pytest.mark.parametrize("name", physics.PROBE_MODELS)
def test_named_probe_library_models_have_the_requested_footprint(name):
    probe = physics.make_probe(name, 64, 40e-9, 8_800, footprint_px=20)
    assert probe.shape[-2:] == (64, 64)
    assert float((np.abs(probe) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    assert 10 < physics.probe_diameter_px(probe) < 30
    with pytest.raises(InvalidInputError, match="unknown"):
        physics.make_probe("laser", 64, 40e-9, 8_800)


def test_zone_plate_far_field_is_an_annulus():
    dx, energy, dr = 20e-9, 10_000, 80e-9
    probe = physics.zone_plate_probe(64, dx, energy, outer_zone_width_m=dr, central_stop=0.5)
    ff = physics.diffraction_intensity(torch.from_numpy(probe), torch.ones(1, 64, 64))[0].numpy()
    c = np.arange(64) - 32
    r = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    r_outer = 64 * dx / (2 * dr)  # pupil radius in detector pixels: N dx / (2 dr) = 8
    assert ff[r < 0.45 * r_outer].sum() < 1e-6  # the central stop is dark
    assert ff[(r > 0.45 * r_outer) & (r < 1.05 * r_outer)].sum() > 0.999 * ff.sum()


def test_mixed_state_modes_are_orthogonal_with_decaying_power():
    modes = physics.mixed_state_probe(physics.kb_probe(64, 20e-9, 10_000), 4, decay=0.5)
    gram = np.einsum("inm,jnm->ij", modes, modes.conj())
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-5
    powers = np.real(np.diag(gram))
    np.testing.assert_allclose(powers / powers[0], [1, 0.5, 0.25, 0.125], rtol=1e-4)


# --- resampling: crop frames 128 -> 64 == simulate at 64 with the resampled probe ---


def test_cropping_frames_equals_simulating_with_the_resampled_probe():
    n_big, n_small = 128, 64
    dx = 10e-9
    # Probe whose far field (an annulus of radius N dx / (2 dr) = 16 px) fits in the 64 crop.
    probe = physics.zone_plate_probe(n_big, dx, 10_000, outer_zone_width_m=40e-9, defocus_m=4e-6)
    # Band-limited object: its spectrum plus the probe's stays inside the cropped window, so the
    # crop discards nothing and the comparison is exact up to float rounding.
    rng = np.random.default_rng(11)
    size = 384
    spectrum = np.zeros((size, size), complex)
    # Frequencies |f| < 0.104 cycles/px, and only multiples of 1/128 so that every 128-px window
    # holds whole periods (otherwise the window's DFT leaks into the discarded band).
    k = 40
    band = np.arange(size // 2 - 39, size // 2 + k, 3)  # offsets -39, -36, ..., 39
    spectrum[np.ix_(band, band)] = rng.standard_normal((band.size, band.size)) + 1j * (
        rng.standard_normal((band.size, band.size))
    )
    phase = np.fft.ifft2(np.fft.ifftshift(spectrum)).real
    phase = 0.5 * phase / np.abs(phase).max()
    # A phase object exp(i phi) is not strictly band-limited; use its first-order expansion,
    # which is, so the test isolates the resampling convention.
    obj_fine = (1 + 1j * phase).astype(np.complex128)
    positions_fine = np.array([[160.0, 160.0], [180.0, 200.0], [222.0, 190.0]])
    big = physics.simulate_diffraction(obj_fine, probe.astype(np.complex128), positions_fine,
                                       photons=1e6, poisson=False)
    cropped = physics.crop_frames(big.expected.numpy(), n_small)

    probe_small = physics.resample_probe(probe.astype(np.complex128), n_small)
    obj_coarse = obj_fine[::2, ::2]  # the object at the doubled pixel size
    positions_coarse = physics.rescale_positions(positions_fine, dx, 2 * dx)
    small = physics.simulate_diffraction(obj_coarse, probe_small, positions_coarse,
                                         photons=1e6, poisson=False)
    # The resampled probe kept all its power (its far field fits), so photon scales agree.
    assert float((np.abs(probe_small) ** 2).sum()) == pytest.approx(1.0, rel=1e-6)
    err = np.abs(small.expected.numpy() - cropped).max() / cropped.max()
    assert err < 1e-4, err


def test_binning_adds_counts_and_keeps_dc_centred():
    frames = np.zeros((1, 8, 8), np.float32)
    frames[0, 4, 4] = 7
    binned = physics.bin_frames(frames, 2)
    assert binned.shape == (1, 4, 4) and binned[0, 2, 2] == 7 and binned.sum() == 7


# --- simulation --------------------------------------------------------------------------------


def test_noiseless_frame_holds_exactly_the_requested_photons(device):
    rng = np.random.default_rng(12)
    # A pure phase object at integer positions (sub-pixel interpolation of a random phase would
    # average phasors and absorb photons).
    obj = np.exp(1j * rng.uniform(-np.pi, np.pi, (128, 128))).astype(np.complex64)
    probe = physics.zone_plate_probe(64, 20e-9, 10_000, defocus_m=10e-6)
    positions = rng.integers(40, 88, size=(20, 2)).astype(float)
    sim = physics.simulate_diffraction(
        obj, torch.from_numpy(probe).to(device), positions, photons=1e6, poisson=False
    )
    sums = sim.expected.sum(dim=(1, 2)).double()
    assert torch.allclose(sums, torch.full_like(sums, 1e6), rtol=1e-4)


def test_poisson_noise_statistics_and_seeding():
    obj = np.ones((96, 96), np.complex64)
    probe = physics.pinhole_probe(32, 10e-9, 8_000)
    pos = np.full((400, 2), 48.0)
    a = physics.simulate_diffraction(obj, probe, pos, photons=2e4, seed=3)
    b = physics.simulate_diffraction(obj, probe, pos, photons=2e4, seed=3)
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.counts, a.counts.round())  # integer photon counts
    # Poisson: variance equals mean, per pixel, over identical frames.
    mean = a.counts.mean(0)
    var = a.counts.var(0)
    bright = mean > 50
    ratio = (var[bright] / mean[bright]).mean().item()
    assert 0.85 < ratio < 1.15, ratio


def test_photon_range_mask_and_beamstop():
    obj = np.ones((80, 80), np.complex64)
    probe = physics.pinhole_probe(32, 10e-9, 8_000)
    mask = physics.beamstop_mask(32, 3.0, bad_pixels=[[0, 0], [5, 7]])
    assert not mask[16, 16] and not mask[5, 7] and mask[16, 25]
    sim = physics.simulate_diffraction(
        obj, probe, np.full((50, 2), 40.0), photons=(5e5, 1e6), mask=mask, seed=1
    )
    scale = sim.photons_per_frame
    assert 5e5 <= scale.min() and scale.max() <= 1e6 and scale.std() > 1e4
    assert (sim.counts[:, ~mask] == 0).all()
    torch.testing.assert_close(
        sim.expected.sum(dim=(1, 2)).double(), scale, rtol=1e-4, atol=0.0
    )
