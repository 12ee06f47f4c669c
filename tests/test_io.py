"""File formats: round trips, conventions at the boundary, and one test per bad-file case."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.errors import FileFormatError, InvalidInputError
from bluesky_ptychopinn.io import (
    EV_TO_J,
    ProbeLibrary,
    PtychoDataset,
    read_cxi,
    read_dataset,
    read_npz,
    read_product,
    write_cxi,
    write_dataset,
    write_npz,
)


@pytest.fixture()
def dataset():
    rng = np.random.default_rng(0)
    n = 32
    probe = physics.make_probe("airy", n, 40e-9, 8_000)
    positions = rng.uniform(20, 60, size=(12, 2))
    frames = rng.poisson(50, size=(12, n, n)).astype(np.float32)
    mask = np.ones((n, n), bool)
    mask[16, 16] = False
    obj = np.exp(1j * rng.uniform(-1, 1, (80, 80))).astype(np.complex64)
    return PtychoDataset(frames, positions, probe, energy_ev=8_000.0, detector_distance_m=1.2,
                         detector_pixel_size_m=75e-6, mask=mask, object=obj)


def test_cxi_round_trip_is_exact_with_si_units(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "a.cxi")
    with h5py.File(path) as f:
        assert f["/entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8_000 * EV_TO_J)
        assert f["/entry_1/instrument_1/detector_1/mask"][16, 16] == 1  # bit 0x1 = invalid
        translation = f["/entry_1/sample_1/geometry_1/translation"][()]
        assert translation.shape == (12, 3)
        # translation x, y in metres = object pixels * pixel size
        np.testing.assert_allclose(translation[:, 0] / dataset.object_pixel_size_m,
                                   dataset.positions_px[:, 1], rtol=1e-12)
    back = read_cxi(path)
    np.testing.assert_array_equal(back.diffraction, dataset.diffraction)
    np.testing.assert_allclose(back.positions_px, dataset.positions_px, atol=1e-9)
    np.testing.assert_array_equal(back.mask, dataset.mask)
    np.testing.assert_array_equal(back.probe, dataset.probe)
    np.testing.assert_array_equal(back.object, dataset.object)
    assert back.energy_ev == pytest.approx(8_000.0)


def test_cxi_accepts_transposed_translations_and_corner_dc(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "a.cxi")
    with h5py.File(path, "a") as f:
        tr = f["/entry_1/sample_1/geometry_1/translation"]
        data, attrs = tr[()], dict(tr.attrs)
        del f["/entry_1/sample_1/geometry_1/translation"]
        new = f.create_dataset("/entry_1/sample_1/geometry_1/translation", data=data.T)
        for k, v in attrs.items():
            new.attrs[k] = v
        frames = f["/entry_1/instrument_1/detector_1/data"]
        frames[...] = np.fft.ifftshift(frames[()], axes=(-2, -1))
        frames.attrs["dc_position"] = "corner"
    back = read_cxi(path)
    np.testing.assert_allclose(back.positions_px, dataset.positions_px, atol=1e-9)
    np.testing.assert_array_equal(back.diffraction, dataset.diffraction)
    assert any("(3, n)" in c for c in back.metadata["conversions"])
    assert any("corner" in c for c in back.metadata["conversions"])


def test_npz_amplitudes_are_squared_to_counts(dataset, tmp_path):
    path = write_npz(dataset, tmp_path / "a.npz")
    with np.load(path) as raw:
        np.testing.assert_allclose(raw["diffraction"] ** 2, dataset.diffraction, rtol=1e-6)
        np.testing.assert_array_equal(raw["xcoords"], dataset.positions_px[:, 1])
    back = read_npz(path)
    np.testing.assert_allclose(back.diffraction, dataset.diffraction, rtol=1e-6)
    assert "amplitude" in back.metadata["conversions"][0]
    counts = read_npz(write_npz(dataset, tmp_path / "b.npz", amplitude=False))
    np.testing.assert_array_equal(counts.diffraction, dataset.diffraction)
    assert back.energy_ev == 8_000.0 and back.mask[16, 16] == np.False_


def test_product_file_is_read_with_positions_in_object_pixels(tmp_path):
    path = tmp_path / "product.h5"
    with h5py.File(path, "w") as f:
        f.attrs["photon_energy_eV"] = 10_000.0
        f.attrs["detector_object_distance_m"] = 2.0
        f["probe"] = np.ones((1, 2, 16, 16), np.complex64)
        obj = f.create_dataset("object", data=np.ones((1, 50, 60), np.complex64))
        obj.attrs.update(center_x_m=1e-6, center_y_m=-1e-6, pixel_width_m=1e-8,
                         pixel_height_m=1e-8)
        f["probe_position_x_m"] = np.array([1e-6, 1.1e-6])
        f["probe_position_y_m"] = np.array([-1e-6, -0.9e-6])
        f["probe_position_indexes"] = np.array([0, 1])
    rec = read_product(path)
    assert rec.probe.shape == (2, 16, 16) and rec.object.shape == (50, 60)
    np.testing.assert_allclose(rec.positions_px, [[24.5, 29.5], [34.5, 39.5]])
    assert rec.energy_ev == 10_000.0


def test_probe_library_add_list_get_remove_and_tamper_detection(tmp_path, dataset):
    library = ProbeLibrary(tmp_path / "probes")
    np.save(tmp_path / "p.npy", dataset.probe)
    meta = library.add("airy", tmp_path / "p.npy", instrument="test", energy_ev=8_000,
                       pixel_size_m=40e-9)
    assert meta["sha256"] and meta["shape"] == [1, 32, 32]
    cxi = write_cxi(dataset, tmp_path / "a.cxi")
    library.add("from-cxi", cxi)  # energy and pixel size come from the file
    assert [m["name"] for m in library.list()] == ["airy", "from-cxi"]
    probe, meta = library.get("airy")
    assert float((np.abs(probe) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(InvalidInputError, match="exists"):
        library.add("airy", dataset.probe, pixel_size_m=40e-9)
    np.savez(tmp_path / "probes" / "airy.npz", probe=probe * 2, pixel_size_m=40e-9)
    with pytest.raises(FileFormatError, match="sha256"):
        library.get("airy")
    library.remove("airy")
    assert [m["name"] for m in library.list()] == ["from-cxi"]


def test_generic_dispatch_and_unknown_type(dataset, tmp_path):
    for suffix in (".cxi", ".npz"):
        back = read_dataset(write_dataset(dataset, tmp_path / f"x{suffix}"))
        assert back.diffraction.shape == dataset.diffraction.shape
    with pytest.raises(FileFormatError, match="unknown file type"):
        write_dataset(dataset, tmp_path / "x.tiff")


# --- bad files: one test per case, each naming the file and the field -----------------------


def _cxi(dataset, tmp_path):
    return write_cxi(dataset, tmp_path / "bad.cxi")


def test_missing_dataset_is_named(dataset, tmp_path):
    path = _cxi(dataset, tmp_path)
    with h5py.File(path, "a") as f:
        del f["/entry_1/instrument_1/detector_1/distance"]
    with pytest.raises(FileFormatError, match=r"bad\.cxi.*detector_1/distance.*missing"):
        read_cxi(path)


def test_wrong_shape_is_named(dataset, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, diff3d=np.ones((4, 8)), probeGuess=np.ones((8, 8), complex),
             xcoords=np.zeros(4), ycoords=np.zeros(4))
    with pytest.raises(FileFormatError, match=r"bad\.npz.*'diff3d'.*3 dimensions"):
        read_npz(path)


def test_non_finite_values_are_named(dataset, tmp_path):
    dataset.diffraction[3, 0, 0] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, diff3d=dataset.diffraction, probeGuess=dataset.probe[0],
             xcoords=dataset.positions_px[:, 1], ycoords=dataset.positions_px[:, 0])
    with pytest.raises(FileFormatError, match=r"bad\.npz.*'diffraction'.*non-finite.*\[3\]"):
        read_npz(path)


def test_inconsistent_lengths_are_named(dataset, tmp_path):
    path = _cxi(dataset, tmp_path)
    with h5py.File(path, "a") as f:
        tr = f["/entry_1/sample_1/geometry_1/translation"]
        data = tr[()][:-2]
        del f["/entry_1/sample_1/geometry_1/translation"]
        f["/entry_1/sample_1/geometry_1/translation"] = data
    with pytest.raises(FileFormatError, match="translation.*10 positions for 12 frames"):
        read_cxi(path)


def test_wrong_dtype_is_named(dataset, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, diff3d=dataset.diffraction.astype(np.complex64), probeGuess=dataset.probe[0],
             xcoords=dataset.positions_px[:, 1], ycoords=dataset.positions_px[:, 0])
    with pytest.raises(FileFormatError, match=r"'diff3d'.*dtype"):
        read_npz(path)


def test_negative_counts_are_named(dataset, tmp_path):
    dataset.diffraction[0, 1, 1] = -5
    with pytest.raises(FileFormatError, match="'diffraction'.*negative"):
        write_cxi(dataset, tmp_path / "bad.cxi")


def test_not_a_file_of_that_kind(tmp_path):
    junk = tmp_path / "junk.cxi"
    junk.write_text("this is not HDF5")
    with pytest.raises(FileFormatError, match=r"junk\.cxi.*not a readable HDF5"):
        read_cxi(junk)
    fake = tmp_path / "junk.npz"
    fake.write_text("nor a zip")
    with pytest.raises(FileFormatError, match=r"junk\.npz.*not a readable NPZ"):
        read_npz(fake)
    with pytest.raises(FileFormatError, match="no such file"):
        read_dataset(tmp_path / "absent.npz")
