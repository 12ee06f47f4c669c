"""File formats: round trips, conventions at the boundary, and one test per bad-file case."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from bluesky_ptychopinn.errors import FileFormatError, InvalidInputError
from bluesky_ptychopinn.io import (
    EV_TO_J,
    ProbeLibrary,
    PtychoDataset,
    default_probe_library_root,
    object_pixel_size_m,
    positions_m_to_px,
    positions_px_to_m,
    probe_array_sha256,
    read_cxi,
    read_dataset,
    read_npz,
    read_probe,
    read_product,
    write_cxi,
    write_dataset,
    write_npz,
)

N = 32
N_FRAMES = 12
DATA = "/entry_1/instrument_1/detector_1/data"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"


def _probe(n: int = N, modes: int = 2) -> np.ndarray:
    """A focused, defocus-curved Gaussian probe with a weaker second mode."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    r2 = (yy**2 + xx**2).astype(float)
    first = np.exp(-r2 / 30.0 + 1j * r2 / 50.0)
    second = 0.3 * (xx / 4.0) * np.exp(-r2 / 40.0)
    return np.stack([first, second][:modes]).astype(np.complex64)


@pytest.fixture()
def dataset() -> PtychoDataset:
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, size=(N_FRAMES, N, N)).astype(np.float32)
    mask = np.ones((N, N), bool)
    mask[N // 2, N // 2] = False  # a beamstop pixel
    mask[3, 5] = False
    obj = np.exp(1j * rng.uniform(-1, 1, (80, 80))).astype(np.complex64)
    return PtychoDataset(
        frames, rng.uniform(17, 63, size=(N_FRAMES, 2)), _probe(), energy_ev=8_000.0,
        detector_distance_m=1.2, detector_pixel_size_m=75e-6, mask=mask, object=obj,
        metadata={"object_class": "random_phase", "seed": 0},
    )


def _raises_naming(path, field: str, call, *args, **kwargs) -> FileFormatError:
    """Assert ``call`` raises FileFormatError whose message names the file and the field."""
    with pytest.raises(FileFormatError) as info:
        call(*args, **kwargs)
    error = info.value
    assert error.path == str(path) and str(path) in str(error)
    assert error.field == field, str(error)
    if field:  # "" = the file as a whole
        assert f"field '{field}'" in str(error), str(error)
    return error


def _replace(path, key: str, data) -> None:
    """Replace the HDF5 dataset ``key`` of the file ``path`` (its attributes are kept)."""
    with h5py.File(path, "a") as f:
        attrs = dict(f[key].attrs)
        del f[key]
        f.create_dataset(key, data=data).attrs.update(attrs)


def _npz(path, **arrays) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


# --- geometry -------------------------------------------------------------------------------


def test_io_imports_without_torch():
    code = "import sys, bluesky_ptychopinn.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_object_pixel_size_is_lambda_z_over_n_p(dataset):
    # 10 keV: lambda = 1.23984198e-6 / 1e4 m; z = 2 m; N p = 128 * 75 um.
    assert object_pixel_size_m(10_000, 2.0, 75e-6, 128) == pytest.approx(
        1.23984198e-10 * 2.0 / (128 * 75e-6), rel=1e-15)
    assert dataset.object_pixel_size_m == pytest.approx(1.23984198e-6 / 8_000 * 1.2 / (N * 75e-6))
    print(f"dx at 8 keV, 1.2 m, 32 x 75 um: {dataset.object_pixel_size_m * 1e9:.3f} nm")


def test_positions_m_to_px_origin_sign_and_inverse():
    rng = np.random.default_rng(1)
    metres = rng.uniform(-5e-6, 5e-6, size=(50, 2))
    dx = 2.5e-8
    px = positions_m_to_px(metres, dx, frame_size=64, margin_px=3)
    np.testing.assert_allclose(px.min(axis=0), [64 / 2 + 3] * 2, atol=1e-9)
    np.testing.assert_allclose(np.ptp(px, axis=0), np.ptp(metres, axis=0) / dx, rtol=1e-12)
    mirrored = positions_m_to_px(metres, dx, sign=-1, frame_size=64, margin_px=3)
    np.testing.assert_allclose(mirrored.min(axis=0), [35, 35], atol=1e-9)
    np.testing.assert_allclose(mirrored[:, 0] - mirrored[0, 0], -(px[:, 0] - px[0, 0]), atol=1e-9)
    origin = (1e-6, -2e-6)
    back = positions_px_to_m(positions_m_to_px(metres, dx, origin, -1), dx, origin, -1)
    np.testing.assert_allclose(back, metres, rtol=0, atol=1e-20)
    with pytest.raises(InvalidInputError, match="frame_size"):
        positions_m_to_px(metres, dx)


def test_dataset_validate_in_memory_names_the_field(dataset):
    dataset.probe = dataset.probe[:, :16, :16]
    with pytest.raises(InvalidInputError, match=r"PtychoDataset\.probe: expected \(M, 32, 32\)"
                       ) as info:
        dataset.validate()
    assert not isinstance(info.value, FileFormatError)  # in memory: no file to name
    with pytest.raises(InvalidInputError, match="object_pixel_size_m.*lambda z"):
        PtychoDataset(np.ones((1, 8, 8)), np.zeros((1, 2)), np.ones((8, 8)), energy_ev=8e3,
                      detector_distance_m=1.0, detector_pixel_size_m=75e-6,
                      object_pixel_size_m=1e-9).validate()


# --- NPZ ------------------------------------------------------------------------------------


def test_npz_round_trip_squares_amplitudes_to_counts(dataset, tmp_path):
    path = write_npz(dataset, tmp_path / "a.npz")
    with np.load(path) as raw:
        np.testing.assert_array_equal(raw["diffraction"], np.sqrt(dataset.diffraction))
        np.testing.assert_array_equal(raw["xcoords"], dataset.positions_px[:, 1])
        np.testing.assert_array_equal(raw["ycoords"], dataset.positions_px[:, 0])
        assert raw["probeGuess"].shape == (2, N, N) and "diff3d" not in raw
    back = read_npz(path)
    error = np.abs(back.diffraction - dataset.diffraction).max() / dataset.diffraction.max()
    print(f"NPZ amplitude round trip: max |counts error| / max counts = {error:.2e}")
    np.testing.assert_allclose(back.diffraction, dataset.diffraction, rtol=2e-7)
    assert back.diffraction.dtype == np.float32
    assert back.metadata["conversions"][0].startswith("diffraction was amplitude")
    np.testing.assert_array_equal(back.positions_px, dataset.positions_px)
    np.testing.assert_array_equal(back.probe, dataset.probe)
    np.testing.assert_array_equal(back.object, dataset.object)
    np.testing.assert_array_equal(back.mask, dataset.mask)
    assert (back.energy_ev, back.detector_distance_m, back.object_pixel_size_m) == (
        dataset.energy_ev, dataset.detector_distance_m, dataset.object_pixel_size_m)
    assert back.metadata["object_class"] == "random_phase"
    assert back.metadata["format"] == "ptychopinn-npz" and back.metadata["source"] == str(path)


def test_npz_counts_round_trip_is_exact_and_keeps_integer_dtype(dataset, tmp_path):
    dataset.diffraction = dataset.diffraction.astype(np.int32)
    back = read_npz(write_npz(dataset, tmp_path / "counts.npz", amplitude=False))
    assert back.diffraction.dtype == np.int32
    np.testing.assert_array_equal(back.diffraction, dataset.diffraction)
    assert back.metadata["conversions"][0] == "diff3d taken as photon counts (no conversion)"


def test_npz_plain_ptychopinn_file_is_read(tmp_path):
    rng = np.random.default_rng(2)
    counts = rng.poisson(20, size=(5, 16, 16)).astype(np.float32)
    path = tmp_path / "ptychopinn.npz"
    _npz(path, diffraction=np.sqrt(counts), probeGuess=_probe(16, 1)[0],
         objectGuess=np.ones((40, 40), np.complex64), xcoords=np.arange(5.0) + 10,
         ycoords=np.arange(5.0) + 20, scan_index=np.arange(5), Y=np.ones((5, 16, 16), complex))
    ds = read_npz(path)
    np.testing.assert_allclose(ds.diffraction, counts, rtol=2e-7)
    np.testing.assert_array_equal(ds.positions_px, np.stack([np.arange(5.0) + 20,
                                                             np.arange(5.0) + 10], axis=1))
    assert ds.probe.shape == (1, 16, 16) and ds.energy_ev is None and ds.mask is None
    assert ds.metadata["scan_index"] == [0, 1, 2, 3, 4]
    assert "not read: Y" in ds.metadata["conversions"]


# --- CXI ------------------------------------------------------------------------------------


def test_cxi_round_trip_is_exact_with_si_units(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "a.cxi", command="pytest")
    dx = dataset.object_pixel_size_m
    with h5py.File(path) as f:
        assert f["cxi_version"][()] == 160
        assert f["/entry_1/instrument_1/source_1/energy"][()] == 8_000 * EV_TO_J
        bits = f["/entry_1/instrument_1/detector_1/mask"][()]
        assert bits.dtype == np.uint32 and bits[N // 2, N // 2] == 1 and bits[3, 5] == 1
        assert int(bits.sum()) == 2  # every other pixel valid: bit 0x1 clear
        data = f[DATA]
        assert data.chunks == (1, N, N) and data.compression == "gzip"
        np.testing.assert_array_equal(f["/entry_1/data_1/data"][()], dataset.diffraction)
        translation = f[TRANSLATION][()]
        assert translation.shape == (N_FRAMES, 3) and not translation[:, 2].any()
        np.testing.assert_allclose(translation[:, 0], dataset.positions_px[:, 1] * dx, rtol=1e-15)
        np.testing.assert_allclose(translation[:, 1], dataset.positions_px[:, 0] * dx, rtol=1e-15)
        assert f["/entry_1/image_1/data"].shape == (1, 2, N, N)
        assert f["/entry_1/process_1/command"][()] == b"pytest"
    back = read_cxi(path)
    np.testing.assert_array_equal(back.diffraction, dataset.diffraction)
    np.testing.assert_array_equal(back.mask, dataset.mask)
    np.testing.assert_array_equal(back.probe, dataset.probe)
    np.testing.assert_array_equal(back.object, dataset.object)
    worst = np.abs(back.positions_px - dataset.positions_px).max()
    print(f"CXI position round trip px -> m -> px: max error {worst:.1e} px")
    assert worst < 1e-12
    assert back.energy_ev == pytest.approx(8_000.0, rel=1e-15)
    assert back.object_pixel_size_m == dx
    assert back.metadata["object_class"] == "random_phase"
    assert back.metadata["provenance"]["program"] == "bluesky-ptychopinn"


def test_cxi_keeps_integer_frames(dataset, tmp_path):
    dataset.diffraction = dataset.diffraction.astype(np.uint16)
    back = read_cxi(write_cxi(dataset, tmp_path / "int.cxi"))
    assert back.diffraction.dtype == np.uint16
    np.testing.assert_array_equal(back.diffraction, dataset.diffraction)


def test_cxi_accepts_translation_stored_3_by_n(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "pynx.cxi")
    with h5py.File(path) as f:
        translation = f[TRANSLATION][()]
    _replace(path, TRANSLATION, translation.T)
    back = read_cxi(path)
    np.testing.assert_allclose(back.positions_px, dataset.positions_px, rtol=0, atol=1e-12)
    assert "translation stored (3, n): transposed to (n, 3)" in back.metadata["conversions"]


def test_cxi_corner_dc_frames_are_fftshifted(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "corner.cxi")
    rng = np.random.default_rng(3)
    raw = rng.poisson(5, size=(N_FRAMES, N, N)).astype(np.float32)
    raw[:, 0, 0] = 1e4  # DC at the corner
    _replace(path, DATA, raw)
    with h5py.File(path, "a") as f:
        f[DATA].attrs["dc_position"] = "corner"
    back = read_cxi(path)
    np.testing.assert_array_equal(back.diffraction, np.fft.fftshift(raw, axes=(-2, -1)))
    assert (back.diffraction[:, N // 2, N // 2] == 1e4).all()
    assert any(c.startswith("frames had DC at the corner") for c in back.metadata["conversions"])
    as_stored = read_cxi(path, dc_position="center")  # the caller overrides the attribute
    np.testing.assert_array_equal(as_stored.diffraction, raw)
    # Writing with the DC at the corner round-trips frames and mask to the centre.
    again = read_cxi(write_cxi(dataset, tmp_path / "w.cxi", dc_position="corner"))
    np.testing.assert_array_equal(again.diffraction, dataset.diffraction)
    np.testing.assert_array_equal(again.mask, dataset.mask)
    # Odd N, where fftshift and ifftshift differ: the corner DC must land on (N//2, N//2).
    odd = np.zeros((2, 15, 15), np.float32)
    odd[:, 15 // 2, 15 // 2] = 7.0
    small = PtychoDataset(odd, np.full((2, 2), 20.0), np.ones((15, 15)), energy_ev=8e3,
                          detector_distance_m=1.0, detector_pixel_size_m=75e-6)
    path = write_cxi(small, tmp_path / "odd.cxi", dc_position="corner")
    with h5py.File(path) as f:
        assert f[DATA][0, 0, 0] == 7.0
    np.testing.assert_array_equal(read_cxi(path).diffraction, odd)


def test_cxi_without_our_origin_puts_lowest_position_inside(dataset, tmp_path):
    path = write_cxi(dataset, tmp_path / "foreign.cxi")
    with h5py.File(path, "a") as f:
        del f[TRANSLATION].attrs["object_origin_yx_m"]
        del f[TRANSLATION].attrs["position_sign"]
        del f[DATA].attrs["dc_position"]
    back = read_cxi(path, margin_px=2)
    np.testing.assert_allclose(back.positions_px.min(axis=0), [N / 2 + 2] * 2, atol=1e-9)
    shift = back.positions_px - dataset.positions_px  # a rigid shift, nothing else
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-9)
    assert "no dc_position attribute: DC found at the center of the mean frame" in \
        back.metadata["conversions"]


# --- ptychodus product ------------------------------------------------------------------------


def test_product_file_is_read_with_positions_in_object_pixels(tmp_path):
    path = tmp_path / "product.h5"
    dx, cx, cy, h, w = 1e-8, 1e-6, -1e-6, 50, 60
    truth_px = np.array([[24.5, 29.5], [34.5, 39.5], [10.0, 12.25]])  # (y, x)
    probe = np.stack([_probe(16), 2 * _probe(16)])  # OPR modes: we keep the first
    with h5py.File(path, "w") as f:
        f.attrs.update(photon_energy_eV=10_000.0, detector_object_distance_m=2.0, name="test")
        f["probe"] = probe
        f["probe"].attrs.update(pixel_width_m=dx, pixel_height_m=dx)
        obj = f.create_dataset("object", data=np.ones((2, h, w), np.complex64))
        obj.attrs.update(center_x_m=cx, center_y_m=cy, pixel_width_m=dx, pixel_height_m=dx)
        # ptychodus: x_m = center_x_m + dx * (x_px - (W - 1) / 2)
        f["probe_position_x_m"] = cx + dx * (truth_px[:, 1] - (w - 1) / 2)
        f["probe_position_y_m"] = cy + dx * (truth_px[:, 0] - (h - 1) / 2)
        f["probe_position_indexes"] = np.array([0, 1, 2])
        f["loss_values"] = np.array([0.3, 0.2, 0.1])
    rec = read_product(path)
    assert rec.probe.shape == (2, 16, 16) and rec.object.shape == (h, w)
    np.testing.assert_array_equal(rec.probe, probe[0])
    np.testing.assert_allclose(rec.positions_px, truth_px, rtol=0, atol=1e-9)
    assert rec.energy_ev == 10_000.0 and rec.detector_distance_m == 2.0
    assert rec.object_pixel_size_m == dx
    np.testing.assert_array_equal(rec.loss_values, [0.3, 0.2, 0.1])
    np.testing.assert_array_equal(rec.position_indexes, [0, 1, 2])
    assert "probe: kept OPR mode 0 of 2" in rec.metadata["conversions"]
    assert "object: kept layer 0 of 2" in rec.metadata["conversions"]


# --- probe library ----------------------------------------------------------------------------


def test_probe_library_add_list_get_show_remove(dataset, tmp_path):
    library = ProbeLibrary(tmp_path / "probes")
    probe = dataset.probe
    unit = probe / np.sqrt(np.sum(np.abs(probe.astype(np.complex128)) ** 2))
    np.save(tmp_path / "p.npy", probe)
    meta = library.add("from-npy", tmp_path / "p.npy", instrument="test", energy_ev=8_000,
                       pixel_size_m=40e-9)
    assert meta["shape"] == [2, N, N] and meta["modes"] == 2 and meta["instrument"] == "test"
    assert meta["sha256"] == probe_array_sha256(unit.astype(np.complex64))
    # Energy and pixel size come from the files themselves.
    cxi = library.add("from-cxi", write_cxi(dataset, tmp_path / "a.cxi"))
    npz = library.add("from-npz", write_npz(dataset, tmp_path / "a.npz"))
    for meta in (cxi, npz):
        assert meta["energy_ev"] == pytest.approx(8_000.0)
        assert meta["pixel_size_m"] == pytest.approx(dataset.object_pixel_size_m, rel=1e-12)
    assert [m["name"] for m in library.list()] == ["from-cxi", "from-npy", "from-npz"]
    got, meta = library.get("from-npy")
    assert got.dtype == np.complex64 and float(np.sum(np.abs(got) ** 2)) == pytest.approx(1, 1e-6)
    np.testing.assert_allclose(got, unit, rtol=0, atol=1e-7)
    assert library.show("from-cxi")["source"] == str(tmp_path / "a.cxi")
    with pytest.raises(InvalidInputError, match="already exists"):
        library.add("from-npy", probe, energy_ev=8_000, pixel_size_m=40e-9)
    with pytest.raises(InvalidInputError, match="pixel size unknown.*--pixel-m"):
        library.add("bare", probe, energy_ev=8_000)
    library.add("from-npy", 2 * probe, energy_ev=9_000, pixel_size_m=40e-9, overwrite=True)
    assert library.show("from-npy")["energy_ev"] == 9_000.0
    library.remove("from-npy")
    assert library.names() == ["from-cxi", "from-npz"]
    with pytest.raises(InvalidInputError, match=r"not in .*known: from-cxi, from-npz"):
        library.get("from-npy")


def test_probe_library_reads_a_ptychodus_product(tmp_path):
    path = tmp_path / "product.h5"
    with h5py.File(path, "w") as f:
        f.attrs["photon_energy_eV"] = 9_000.0
        f["probe"] = _probe(16)[None]
        obj = f.create_dataset("object", data=np.ones((1, 40, 40), np.complex64))
        obj.attrs.update(center_x_m=0.0, center_y_m=0.0, pixel_width_m=2e-8, pixel_height_m=2e-8)
        f["probe_position_x_m"] = np.zeros(3)
        f["probe_position_y_m"] = np.zeros(3)
    probe, info = read_probe(path)
    assert probe.shape == (2, 16, 16) and info["energy_ev"] == 9_000.0
    meta = ProbeLibrary(tmp_path / "lib").add("product", path, instrument="2-ID-D")
    assert meta["pixel_size_m"] == 2e-8 and meta["energy_ev"] == 9_000.0


def test_probe_library_detects_sha256_mismatch(dataset, tmp_path):
    library = ProbeLibrary(tmp_path / "probes")
    library.add("zp", dataset.probe, energy_ev=8_000, pixel_size_m=40e-9)
    probe, _ = library.get("zp")
    tampered = probe.copy()
    tampered[0, 0, 0] += 1e-3
    _npz(tmp_path / "probes" / "zp.npz", probe=tampered, pixel_size_m=40e-9)
    error = _raises_naming(tmp_path / "probes" / "zp.npz", "probe", library.get, "zp")
    assert "sha256 mismatch" in str(error)
    meta = json.loads((tmp_path / "probes" / "zp.json").read_text())
    assert meta["sha256"] == probe_array_sha256(probe)


def test_probe_library_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PTYCHOPINN_PROBE_LIBRARY", str(tmp_path / "env-lib"))
    assert ProbeLibrary().root == tmp_path / "env-lib" == default_probe_library_root()
    monkeypatch.delenv("PTYCHOPINN_PROBE_LIBRARY")
    assert default_probe_library_root().parts[-3:] == ("share", "bluesky-ptychopinn", "probes")


# --- generic dispatch -------------------------------------------------------------------------


def test_read_dataset_dispatches_on_content_then_extension(dataset, tmp_path):
    cxi = write_dataset(dataset, tmp_path / "x.h5")
    npz = write_dataset(dataset, tmp_path / "x.npz", amplitude=False)
    renamed = tmp_path / "scan.dat"
    renamed.write_bytes(cxi.read_bytes())  # HDF5 content whatever the name
    for path in (cxi, npz, renamed):
        np.testing.assert_array_equal(read_dataset(path).diffraction, dataset.diffraction)
    product = tmp_path / "product.h5"
    with h5py.File(product, "w") as f:
        f["probe"], f["object"] = _probe(16), np.ones((1, 8, 8), np.complex64)
    with pytest.raises(FileFormatError, match="read_product"):
        read_dataset(product)
    with pytest.raises(InvalidInputError, match="unknown file type '.tiff'"):
        write_dataset(dataset, tmp_path / "x.tiff")
    _raises_naming(tmp_path / "absent.npz", "", read_dataset, tmp_path / "absent.npz")


# --- bad files: one test per case, each naming the file and the field -----------------------


def test_bad_file_missing_dataset(dataset, tmp_path):
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    with h5py.File(cxi, "a") as f:
        del f["/entry_1/instrument_1/detector_1/distance"]
    error = _raises_naming(cxi, "/entry_1/instrument_1/detector_1/distance", read_cxi, cxi)
    assert "missing" in str(error)
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=dataset.diffraction, xcoords=np.zeros(N_FRAMES), ycoords=np.zeros(N_FRAMES))
    assert "missing" in str(_raises_naming(npz, "probeGuess", read_npz, npz))


def test_bad_file_wrong_shape_2d_diffraction(dataset, tmp_path):
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=np.ones((4, 8)), probeGuess=np.ones((8, 8), complex),
         xcoords=np.zeros(4), ycoords=np.zeros(4))
    error = _raises_naming(npz, "diff3d", read_npz, npz)
    assert "expected 3 dimensions, got shape (4, 8)" in str(error)
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    _replace(cxi, DATA, dataset.diffraction[0])
    assert "expected 3 dimensions" in str(_raises_naming(cxi, DATA, read_cxi, cxi))


def test_bad_file_non_finite_frame(dataset, tmp_path):
    dataset.diffraction[3, 0, 0] = np.nan
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=dataset.diffraction, probeGuess=dataset.probe[0],
         xcoords=dataset.positions_px[:, 1], ycoords=dataset.positions_px[:, 0])
    error = _raises_naming(npz, "diff3d", read_npz, npz)
    assert "non-finite values (NaN/inf) in 1 frame(s), first [3]" in str(error)
    cxi = tmp_path / "bad.cxi"
    dataset.diffraction[3, 0, 0] = 0
    write_cxi(dataset, cxi)
    frames = dataset.diffraction.copy()
    frames[7, 5, 5] = np.inf
    _replace(cxi, DATA, frames)
    assert "first [7]" in str(_raises_naming(cxi, DATA, read_cxi, cxi))


def test_bad_file_inconsistent_lengths(dataset, tmp_path):
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    with h5py.File(cxi) as f:
        translation = f[TRANSLATION][()]
    _replace(cxi, TRANSLATION, translation[:-2])
    error = _raises_naming(cxi, TRANSLATION, read_cxi, cxi)
    assert "inconsistent lengths: 10 positions for 12 frames" in str(error)
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=dataset.diffraction, probeGuess=dataset.probe[0],
         xcoords=np.zeros(N_FRAMES - 1), ycoords=np.zeros(N_FRAMES - 1))
    error = _raises_naming(npz, "xcoords, ycoords", read_npz, npz)
    assert "11 positions for 12 frames" in str(error)


def test_bad_file_wrong_dtype(dataset, tmp_path):
    npz = tmp_path / "bad.npz"
    _npz(npz, diffraction=np.full((2, 4, 4), "a"), probeGuess=np.ones((4, 4), complex),
         xcoords=np.zeros(2), ycoords=np.zeros(2))
    error = _raises_naming(npz, "diffraction", read_npz, npz)
    assert "expected dtype unsigned int or int or float, got <U1" in str(error)
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    _replace(cxi, DATA, dataset.diffraction.astype(np.complex64))
    assert "got complex64" in str(_raises_naming(cxi, DATA, read_cxi, cxi))


def test_bad_file_not_hdf5_or_npz(dataset, tmp_path):
    junk = tmp_path / "junk.cxi"
    junk.write_text("this is not HDF5")
    assert "not a readable HDF5 file" in str(_raises_naming(junk, "", read_cxi, junk))
    fake = tmp_path / "junk.npz"
    fake.write_text("nor a zip archive")
    assert "not a readable NPZ file" in str(_raises_naming(fake, "", read_npz, fake))
    single = tmp_path / "single.npz"
    np.save(single.with_suffix(".npy"), np.ones(3))
    single.with_suffix(".npy").rename(single)
    assert "a single .npy array" in str(_raises_naming(single, "", read_npz, single))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert "unknown kind of file" in str(_raises_naming(other, "", read_dataset, other))


def test_bad_file_negative_counts(dataset, tmp_path):
    frames = dataset.diffraction.astype(np.int32)
    frames[0, 1, 1] = -5
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=frames, probeGuess=dataset.probe[0],
         xcoords=dataset.positions_px[:, 1], ycoords=dataset.positions_px[:, 0])
    error = _raises_naming(npz, "diff3d", read_npz, npz)
    assert "expected photon counts >= 0, got negative values (min -5)" in str(error)
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    _replace(cxi, DATA, frames)
    assert "negative" in str(_raises_naming(cxi, DATA, read_cxi, cxi))
    amplitudes = tmp_path / "amplitudes.npz"
    _npz(amplitudes, diffraction=-np.ones((2, 4, 4), np.float32), probeGuess=np.ones((4, 4)),
         xcoords=np.zeros(2), ycoords=np.zeros(2))
    assert "amplitudes >= 0" in str(_raises_naming(amplitudes, "diffraction", read_npz,
                                                   amplitudes))


def test_bad_file_energy_in_ev_instead_of_joules(dataset, tmp_path):
    cxi = write_cxi(dataset, tmp_path / "bad.cxi")
    _replace(cxi, "/entry_1/instrument_1/source_1/energy", 8_000.0)
    error = _raises_naming(cxi, "/entry_1/instrument_1/source_1/energy", read_cxi, cxi)
    assert "looks like eV or keV: CXI stores joules" in str(error)


def test_bad_file_probe_shape_does_not_match_frames(dataset, tmp_path):
    npz = tmp_path / "bad.npz"
    _npz(npz, diff3d=dataset.diffraction, probeGuess=np.ones((N + 2, N + 2), complex),
         xcoords=dataset.positions_px[:, 1], ycoords=dataset.positions_px[:, 0])
    error = _raises_naming(npz, "probeGuess", read_npz, npz)
    assert f"expected (M, {N}, {N}) to match the frames, got shape (1, {N + 2}, {N + 2})" in \
        str(error)


def test_writers_validate_before_writing(dataset, tmp_path):
    dataset.diffraction[0, 1, 1] = -5
    for writer, name in ((write_cxi, "w.cxi"), (write_npz, "w.npz")):
        with pytest.raises(InvalidInputError, match=r"PtychoDataset\.diffraction.*negative"):
            writer(dataset, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_reconstruct_never_overwrites_silently_and_creates_the_output_directory(tmp_path):
    """A reconstruction is never lost at the end: an existing output is refused before any
    work (naming the CLI flags), and a missing output directory is created."""
    import subprocess
    import sys
    from pathlib import Path

    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn.io import PtychoDataset, write_dataset

    probe = physics.make_probe("zone_plate", 32, 40e-9, 8_800)
    obj = np.exp(0.3j * np.random.default_rng(0).random((80, 80))).astype(np.complex64)
    pos = physics.scan_pattern("raster", (24.0, 24.0), step=8.0) + 40
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e5, seed=0).counts.numpy()
    source = write_dataset(PtychoDataset(counts, pos, probe, energy_ev=8_800,
                                         detector_distance_m=2.0, detector_pixel_size_m=75e-6),
                           tmp_path / "scan.cxi")
    out = tmp_path / "new" / "dir" / "recon.cxi"

    def run(*extra):
        cli = str(Path(sys.executable).with_name("bluesky-ptychopinn"))
        return subprocess.run([cli, "reconstruct", str(source), "--epochs", "1", "-o", str(out),
                               *extra],
                              capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    assert out.is_file() and out.with_suffix(".png").is_file()
    before = out.stat().st_mtime_ns
    second = run()
    assert second.returncode != 0 and "--overwrite" in second.stderr + second.stdout
    assert "PosixPath" not in second.stderr + second.stdout
    assert out.stat().st_mtime_ns == before
    assert run("--overwrite").returncode == 0 and out.stat().st_mtime_ns != before


def test_the_own_data_guide_runs_as_written(tmp_path, monkeypatch):
    """docs/own-data.md's example: a foreign layout converted by hand, written, read back."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "own-data.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    assert (tmp_path / "my_scan.cxi").is_file()


def test_integer_amplitudes_warn_that_they_look_like_counts(tmp_path):
    from bluesky_ptychopinn.io import read_npz

    path = tmp_path / "counts_as_amplitude.npz"
    np.savez(path, diffraction=np.full((3, 8, 8), 4.0, np.float32),
             probeGuess=np.ones((8, 8), np.complex64), xcoords=np.arange(3.0) + 10,
             ycoords=np.arange(3.0) + 10)
    with pytest.warns(UserWarning, match="look like photon counts"):
        read_npz(path)


def test_import_converts_a_foreign_layout_and_records_every_conversion(tmp_path):
    """`bluesky-ptychopinn import`: a bare HDF5 (amplitudes, DC at the corner, (x, y) window
    corners in metres) becomes the project's CXI; positions match the true probe centres up to
    the recorded shift, frames match the counts."""
    import subprocess
    import sys
    from pathlib import Path

    import h5py

    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn.geometry import object_pixel_size_m
    from bluesky_ptychopinn.io import read_dataset

    n, energy, dist, pix = 32, 8800.0, 2.0, 75e-6
    dx = object_pixel_size_m(energy, dist, pix, n)
    probe = physics.make_probe("zone_plate", n, dx, energy)
    obj = np.exp(0.3j * np.random.default_rng(0).random((90, 90))).astype(np.complex64)
    centres = physics.scan_pattern("raster", (30.0, 30.0), step=6.0) + 45
    counts = physics.simulate_diffraction(obj, probe, centres, photons=1e5,
                                          seed=0).counts.numpy()
    src = tmp_path / "foreign.h5"
    with h5py.File(src, "w") as f:
        f["entry/amp"] = np.fft.ifftshift(np.sqrt(counts), axes=(-2, -1))
        f["entry/pos_xy"] = ((centres - n / 2) * dx)[:, ::-1]
    cli = str(Path(sys.executable).with_name("bluesky-ptychopinn"))
    base = [cli, "import", str(src), str(tmp_path / "out" / "scan.cxi")]
    listing = subprocess.run(base, capture_output=True, text=True, timeout=120)
    said = listing.stdout + listing.stderr
    assert listing.returncode != 0 and "entry/amp" in said and "--frames" in said
    done = subprocess.run([*base, "--frames", "entry/amp", "--positions", "entry/pos_xy",
                           "--frames-are", "amplitude", "--dc", "corner", "--positions-are",
                           "corner", "--xy", "--units", "m", "--energy-ev", str(energy),
                           "--distance-m", str(dist), "--detector-pixel-m", str(pix)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    ds = read_dataset(tmp_path / "out" / "scan.cxi")
    np.testing.assert_allclose(ds.diffraction, counts, rtol=1e-4, atol=1e-3)
    offset = ds.positions_px - centres
    np.testing.assert_allclose(offset, offset[0] + 0 * offset, atol=1e-6)  # one rigid shift
    conversions = " ".join(ds.metadata["written_from"]["conversions"])  # the import's
    assert ds.metadata["import"]["source"] == str(src)
    for word in ("amplitude", "DC", "corner", "(x, y)", "metres"):
        assert word in conversions
