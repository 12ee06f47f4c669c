"""CXI files written by other programs (review of 2026-12-02): lengths in other units, the
cxidb pixel-mask bits, detector flags at masked pixels, integer markers, frames only under
``data_1``, DC at the corner without an attribute, big-endian data, and a file declaring more
than memory holds. Each is read right or refused with a clear error, never misread silently."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bluesky_ptychopinn.errors import FileFormatError
from bluesky_ptychopinn.io import PtychoDataset, read_cxi, write_cxi
from bluesky_ptychopinn.io._checks import memory_bytes
from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct

N, N_FRAMES = 32, 9
DET = "/entry_1/instrument_1/detector_1"
DATA, MASK = f"{DET}/data", f"{DET}/mask"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"


@pytest.fixture()
def cxi(tmp_path):
    """Our own CXI file of a small dataset (frames brightest at the centre, as data are)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:N, :N] - N // 2
    centre_peak = 400 * np.exp(-(yy**2 + xx**2) / 20.0)
    frames = rng.poisson(centre_peak + 2, size=(N_FRAMES, N, N)).astype(np.float32)
    probe = np.exp(-(yy**2 + xx**2) / 30.0).astype(np.complex64)
    positions = 20 + 3 * np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2)
    ds = PtychoDataset(frames, positions.astype(float), probe, energy_ev=8_000.0,
                       detector_distance_m=1.2, detector_pixel_size_m=75e-6)
    path = tmp_path / "scan.cxi"
    write_cxi(ds, path)
    return path, read_cxi(path)


def _edit(path, key, *, data=None, units=None, drop_attr=None):
    with h5py.File(path, "a") as f:
        if data is not None:
            attrs = dict(f[key].attrs)
            del f[key]
            f.create_dataset(key, data=data).attrs.update(attrs)
        if units is not None:
            f[key].attrs["units"] = units
        if drop_attr is not None:
            del f[key].attrs[drop_attr]


def test_lengths_in_other_units_are_converted_and_recorded(cxi):
    path, ours = cxi
    with h5py.File(path, "r") as f:
        translation, distance = f[TRANSLATION][()], f[f"{DET}/distance"][()]
    _edit(path, TRANSLATION, data=translation * 1e6, units="um")
    _edit(path, f"{DET}/distance", data=distance * 1e3, units="mm")
    back = read_cxi(path)
    np.testing.assert_allclose(back.positions_px, ours.positions_px, atol=1e-6)
    assert back.detector_distance_m == pytest.approx(ours.detector_distance_m, rel=1e-12)
    assert f"{TRANSLATION}: um -> m" in back.metadata["conversions"]
    assert f"{DET}/distance: mm -> m" in back.metadata["conversions"]


def test_an_unknown_unit_or_an_implausible_length_is_refused(cxi):
    path, _ = cxi
    _edit(path, TRANSLATION, units="furlong")
    with pytest.raises(FileFormatError, match="unknown length unit 'furlong'"):
        read_cxi(path)
    _edit(path, TRANSLATION, units="m")
    _edit(path, f"{DET}/distance", data=1200.0 * 1e3)  # mm stored without a units attribute
    with pytest.raises(FileFormatError, match="not a plausible value"):
        read_cxi(path)


def test_every_unusable_mask_bit_masks_and_flags_there_do_not_break_the_read(cxi):
    path, _ = cxi
    bits = np.zeros((N, N), np.uint32)
    bits[0, :4] = [0x2, 0x8, 0x10, 0x200]  # saturated, dead, beamstop, missing
    bits[1, 0] = 0x20  # "in peak mask": a pixel that still measured
    with h5py.File(path, "a") as f:
        f.create_dataset(MASK, data=bits)  # a foreign detector's mask (ours wrote none)
        frames = f[DATA][()]
    frames[:, 0, 1] = -1  # a detector's flag value at the dead pixel
    frames[:, 0, 2] = np.nan  # and at the beamstop
    _edit(path, DATA, data=frames)
    back = read_cxi(path)
    assert not back.mask[0, :4].any() and back.mask[1, 0] and int((~back.mask).sum()) == 4
    assert (back.diffraction[:, 0, 1:3] == 0).all()
    assert any("flag value(s) at masked pixels" in c for c in back.metadata["conversions"])
    nan_at_valid = frames.copy()
    nan_at_valid[0, 5, 5] = np.nan  # NaN where the mask says valid: still refused
    _edit(path, DATA, data=nan_at_valid)
    with pytest.raises(FileFormatError, match="non-finite"):
        read_cxi(path)


def test_the_integer_maximum_is_a_marker_and_is_masked(cxi):
    path, ours = cxi
    frames = ours.diffraction.astype(np.uint32)
    frames[:, 7, 9] = np.iinfo(np.uint32).max  # a module gap
    _edit(path, DATA, data=frames)
    back = read_cxi(path)
    assert not back.mask[7, 9] and int((~back.mask).sum()) == 1
    assert float(back.diffraction[:, back.mask].max()) < 1e4


def test_frames_only_under_data_1_and_dc_at_the_corner_without_attribute(cxi):
    path, ours = cxi
    with h5py.File(path, "a") as f:
        frames = np.fft.ifftshift(f[DATA][()], axes=(-2, -1))  # DC moved to the corner
        del f["/entry_1/data_1/data"]
        del f[DATA]
        f.create_dataset("/entry_1/data_1/data", data=frames)
    back = read_cxi(path)
    np.testing.assert_array_equal(back.diffraction, ours.diffraction)
    conversions = back.metadata["conversions"]
    assert "frames read from /entry_1/data_1/data (no " + DATA + ")" in conversions
    assert "no dc_position attribute: DC found at the corner of the mean frame" in conversions


def test_big_endian_frames_are_read_in_native_order_and_reconstruct(cxi):
    path, ours = cxi
    _edit(path, DATA, data=ours.diffraction.astype(">f4"))
    back = read_cxi(path)
    assert back.diffraction.dtype.isnative
    np.testing.assert_array_equal(back.diffraction, ours.diffraction)
    result = pie_reconstruct(back.diffraction, back.positions_px, back.probe,
                             options=PIEOptions(n_epochs=1, device="cpu", progress=False))
    assert np.isfinite(result.error_history).all()


def test_a_file_declaring_more_than_memory_is_refused_before_reading(tmp_path, cxi):
    path, _ = cxi
    frames_needed = int(memory_bytes() / (4 * 512 * 512)) + 10
    with h5py.File(path, "a") as f:
        del f["/entry_1/data_1/data"]
        del f[DATA]
        f.create_dataset(DATA, shape=(frames_needed, 512, 512), dtype="f4",
                         chunks=(1, 512, 512), compression="gzip")
    assert path.stat().st_size < 1e6  # nothing written: a few kB declaring GiBs
    with pytest.raises(FileFormatError, match="more than this machine can hold"):
        read_cxi(path)


@pytest.mark.parametrize("layout", ["(n, 3)", "(3, n)"])
def test_three_frames_translation_layout_is_told_by_the_constant_z(tmp_path, layout):
    """With 3 frames the (n, 3) CXI layout and PyNX's (3, n) have the same shape; a (3, n)
    file was read as (n, 3), its positions scrambled. z is the component a scan keeps fixed."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:N, :N] - N // 2
    frames = rng.poisson(300 * np.exp(-(yy**2 + xx**2) / 20.0) + 1,
                         size=(3, N, N)).astype(np.float32)
    probe = np.exp(-(yy**2 + xx**2) / 30.0).astype(np.complex64)
    positions = np.array([[20.0, 21.0], [23.0, 27.0], [29.0, 24.0]])
    ds = PtychoDataset(frames, positions, probe, energy_ev=8_000.0,
                       detector_distance_m=1.2, detector_pixel_size_m=75e-6)
    path = tmp_path / "three.cxi"
    write_cxi(ds, path)
    ours = read_cxi(path)
    with h5py.File(path, "r") as f:
        stored = f[TRANSLATION][()]
    assert stored.shape == (3, 3) and np.ptp(stored[:, 2]) == 0 and np.ptp(stored[2]) != 0
    if layout == "(3, n)":
        _edit(path, TRANSLATION, data=stored.T)
    back = read_cxi(path)
    np.testing.assert_allclose(back.positions_px, ours.positions_px, atol=1e-9)
    said = [c for c in back.metadata["conversions"] if c.startswith("translation (3, 3)")]
    assert len(said) == 1 and ("transposed" in said[0]) == (layout == "(3, n)"), said
