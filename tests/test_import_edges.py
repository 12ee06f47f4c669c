"""Edges of the array importers and the simulated detector (review of 2026-12-02): a complex
or negative "amplitude" is refused rather than silently misread, integer amplitudes read, and
the detector saturates instead of wrapping and never leaks a file when staged twice."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from ophyd.utils import RedundantStaging

from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.errors import FileFormatError
from bluesky_ptychopinn.io import read_npz
from bluesky_ptychopinn.io._import import import_arrays
from bluesky_ptychopinn.physics import diffraction_intensity, extract_patches

GEOMETRY = {"energy_ev": 8800.0, "distance_m": 2.0, "detector_pixel_m": 75e-6}


def _bare(path, frames):
    positions = np.stack([np.arange(len(frames)) * 3.0, np.zeros(len(frames))], -1) * 1e-8
    with h5py.File(path, "w") as f:
        f["frames"], f["positions"] = frames, positions
    return path


def test_complex_frames_are_refused_not_cut_to_their_real_part(tmp_path):
    rng = np.random.default_rng(0)
    psi = (rng.normal(size=(4, 16, 16)) + 1j * rng.normal(size=(4, 16, 16))).astype(np.complex64)
    src = _bare(tmp_path / "psi.h5", psi)
    with pytest.raises(FileFormatError, match="complex values"):
        import_arrays(src, frames="frames", positions="positions", frames_are="amplitude",
                      **GEOMETRY)


def test_negative_amplitudes_are_refused_and_good_ones_squared_exactly(tmp_path):
    rng = np.random.default_rng(1)
    amplitude = rng.uniform(0, 30, (4, 16, 16)).astype(np.float32)
    bad = amplitude.copy()
    bad[1, 2, 3] = -3.9
    with pytest.raises(FileFormatError, match="negative values"):
        import_arrays(_bare(tmp_path / "bad.h5", bad), frames="frames", positions="positions",
                      frames_are="amplitude", **GEOMETRY)
    ds = import_arrays(_bare(tmp_path / "good.h5", amplitude), frames="frames",
                       positions="positions", frames_are="amplitude", **GEOMETRY)
    # The float32 square is the closest float32 to the exact square (done in float64).
    np.testing.assert_array_equal(ds.diffraction,
                                  np.square(amplitude.astype(np.float64)).astype(np.float32))


def test_integer_amplitudes_in_an_npz_are_read(tmp_path):
    rng = np.random.default_rng(2)
    amplitude = rng.integers(0, 9, (3, 16, 16)).astype(np.int16)
    yy, xx = np.mgrid[:16, :16] - 8
    probe = np.exp(-(yy**2 + xx**2) / 10.0).astype(np.complex64)
    path = tmp_path / "int.npz"
    np.savez(path, diffraction=amplitude, probeGuess=probe, xcoords=np.array([12.0, 15, 18]),
             ycoords=np.array([12.0, 12, 12]), energy_ev=8800.0, detector_distance_m=2.0,
             detector_pixel_size_m=75e-6)
    with pytest.warns(UserWarning, match="look like photon counts"):
        ds = read_npz(path)
    np.testing.assert_array_equal(ds.diffraction, amplitude.astype(np.float32) ** 2)


def test_the_detector_saturates_instead_of_wrapping():
    bl = sim_beamline("cells", write_path=None, seed=0, photon_flux=1e15)  # ~1e13 photons
    bl.detector.stage()
    try:
        status = bl.detector.trigger()
        status.wait(30)
        image = bl.detector.read()[bl.detector.image_key]["value"]
    finally:
        bl.detector.unstage()
    top = np.iinfo(np.uint32).max
    assert image.max() == top  # the brightest pixels saturated
    # The brightest pixel of the noise-free pattern (~1e10 photons or more) is saturated,
    # where a wrapped count would be anything below the maximum.
    det = bl.detector
    pos = torch.as_tensor(det.position_px(0.0, 0.0)[None], dtype=torch.float32)
    expected = diffraction_intensity(det._probe, extract_patches(det._sample, pos,
                                                                  det.frame_size))[0]
    brightest = np.unravel_index(int(torch.argmax(expected)), image.shape)
    assert image[brightest] == top


def test_staging_twice_leaves_no_file_open(tmp_path):
    bl = sim_beamline("cells", write_path=tmp_path, seed=0)
    bl.detector.stage()
    first = bl.detector._file
    with pytest.raises(RedundantStaging):
        bl.detector.stage()
    assert bl.detector._file is first  # still writing where the run's resource points
    bl.detector.unstage()
    assert not first.id.valid  # closed at unstage
    assert len(list(tmp_path.glob("*.h5"))) == 1  # no second file was made
