"""Edges of the file readers and of ``simulate``, ``import`` and ``probes add`` (review 3):
outputs are never replaced silently or half-written, a corrected energy keeps a CXI scan in
place in metres, and empty, oversized, misshapen or foreign inputs are one-line errors, not
tracebacks. Every file is a real one under ``tmp_path``; every command is the real CLI."""

from __future__ import annotations

import io
import signal
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bluesky_ptychopinn.cli import app
from bluesky_ptychopinn.io import PtychoDataset, write_cxi, write_npz

N = 32
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
DETECTOR = "/entry_1/instrument_1/detector_1"
#: The geometry `import` needs, for arrays in object pixels.
IMPORT_GEOMETRY = ["--energy-ev", "8800", "--distance-m", "1.5", "--detector-pixel-m", "75e-6",
                   "--units", "px"]


def _dataset(n_side: int = 4) -> PtychoDataset:
    """A small raster scan of Poisson frames with a square probe and full geometry."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n_side, :n_side]
    positions = np.stack([yy.ravel(), xx.ravel()], 1) * 6.0 + N / 2 + 2
    probe = np.zeros((N, N), np.complex64)
    probe[N // 2 - 6: N // 2 + 6, N // 2 - 6: N // 2 + 6] = 1
    frames = rng.poisson(50, (n_side**2, N, N)).astype(np.float32)
    return PtychoDataset(frames, positions, probe, energy_ev=8800.0, detector_distance_m=1.5,
                         detector_pixel_size_m=75e-6)


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> str:
    """The command failed cleanly: exit 2, no traceback, one ``error:`` line holding every
    needle. Returns that line."""
    output = result.output
    assert result.exit_code == 2, (output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


# --- 1. simulate never replaces an existing file silently --------------------------------------

def test_simulate_refuses_an_existing_output_unless_overwrite(tmp_path):
    scan = write_cxi(_dataset(), tmp_path / "beamtime_scan.cxi")
    before = scan.read_bytes()
    small = ["--frame-size", "16", "--object-size", "64"]
    _one_line_error(_cli("simulate", scan, *small), str(scan), "exists", "--overwrite")
    assert scan.read_bytes() == before  # the measurement is untouched
    done = _cli("simulate", scan, *small, "--overwrite")
    assert done.exit_code == 0, done.output
    assert scan.read_bytes() != before


# --- 2. a failed NPZ write leaves the previous file, and no half file --------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_failed_npz_write_keeps_the_previous_file(tmp_path):
    import resource

    src = tmp_path / "foreign.h5"
    ds = _dataset()
    with h5py.File(src, "w") as f:
        f["f"], f["p"], f["probe"] = ds.diffraction, ds.positions_px, ds.probe[0]
    previous = write_npz(_dataset(n_side=2), tmp_path / "result.npz")
    before = previous.read_bytes()
    # A full disk or an exhausted quota, for real: writes past 8 kB fail with EFBIG.
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, limits[1]))
    try:
        result = _cli("import", src, previous, "--frames", "f", "--positions", "p",
                      "--probe", "probe", "--overwrite", *IMPORT_GEOMETRY)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    _one_line_error(result, "File too large")
    assert previous.read_bytes() == before  # still the previous, readable file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.h5", "result.npz"]


# --- 3. --energy-ev keeps CXI positions in metres, NPZ positions in pixels ---------------------

def test_energy_ev_on_a_cxi_keeps_the_scan_span_in_metres(tmp_path):
    scan = write_cxi(_dataset(), tmp_path / "scan.cxi")
    out = tmp_path / "recon.cxi"
    result = _cli("reconstruct", scan, "-o", out, "--epochs", "1", "--energy-ev", "9680")
    assert result.exit_code == 0, result.output
    with h5py.File(scan, "r") as f_in, h5py.File(out, "r") as f_out:
        span_in = np.ptp(f_in[TRANSLATION][:, :2], axis=0)
        span_out = np.ptp(f_out[TRANSLATION][:, :2], axis=0)
        energy_out = f_out["/entry_1/instrument_1/source_1/energy"][()]
    assert energy_out == pytest.approx(9680 * 1.602176634e-19)
    # the same stage positions: not 8800/9680 = 0.91 of them
    np.testing.assert_allclose(span_out, span_in, rtol=1e-9)


def test_energy_ev_on_an_npz_keeps_its_positions_in_pixels(tmp_path):
    ds = _dataset()
    scan = write_npz(ds, tmp_path / "scan.npz")
    out = tmp_path / "recon.npz"
    result = _cli("reconstruct", scan, "-o", out, "--epochs", "1", "--energy-ev", "9680")
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        span_out = np.ptp(np.stack([data["ycoords"], data["xcoords"]], 1), axis=0)
    np.testing.assert_allclose(span_out, np.ptp(ds.positions_px, axis=0), rtol=1e-9)


# --- 4. an NPZ member's size is checked from its header, before it is read ---------------------

def _huge_npz(path: Path) -> Path:
    """A 1 kB NPZ whose ``diffraction`` header declares a (1e6, 4096, 4096) float32 array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 4096, 4096)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("diffraction.npy", header.getvalue() + b"\0" * 64)
        for key in ("xcoords", "ycoords", "probeGuess"):
            member = io.BytesIO()
            np.save(member, np.zeros(3))
            archive.writestr(f"{key}.npy", member.getvalue())
    return path


def test_an_npz_declaring_more_than_memory_is_refused_before_reading(tmp_path):
    huge = _huge_npz(tmp_path / "huge.npz")
    _one_line_error(_cli("reconstruct", huge, "-o", tmp_path / "r.npz", "--epochs", "1"),
                    str(huge), "'diffraction'", "declares (1000000, 4096, 4096)", "GiB")
    # import reads through the same checks, and lists the arrays from their headers alone
    _one_line_error(_cli("import", huge, tmp_path / "i.cxi", "--frames", "diffraction",
                         "--positions", "xcoords", *IMPORT_GEOMETRY),
                    "'diffraction'", "declares (1000000, 4096, 4096)")
    listed = _cli("import", huge, tmp_path / "i.cxi")
    _one_line_error(listed, "pass --frames KEY")
    assert "diffraction  (1000000, 4096, 4096)" in listed.stderr


def test_import_refuses_an_hdf5_dataset_declaring_more_than_memory(tmp_path):
    src = tmp_path / "huge.h5"
    with h5py.File(src, "w") as f:  # never written: a few kB on disk
        f.create_dataset("f", shape=(1_000_000, 4096, 4096), dtype="f4", chunks=(1, 64, 64))
        f["p"] = np.zeros((1_000_000, 2))
    _one_line_error(_cli("import", src, tmp_path / "out.cxi", "--frames", "f", "--positions",
                         "p", *IMPORT_GEOMETRY), "'f'", "declares", "more than this machine")


# --- 5. empty probe and object datasets ---------------------------------------------------------

@pytest.mark.parametrize("key, shape, what", [
    ("/entry_1/image_2/data", (0, 40, 40), "object layer"),
    ("/entry_1/image_1/data", (0, 1, N, N), "probe modes"),
])
def test_an_empty_cxi_probe_or_object_is_a_clear_error(tmp_path, key, shape, what):
    scan = write_cxi(_dataset(), tmp_path / "scan.cxi")
    with h5py.File(scan, "a") as f:
        if key in f:
            del f[key]
        f.create_dataset(key, shape=shape, dtype=np.complex64)
    _one_line_error(_cli("reconstruct", scan, "-o", tmp_path / "r.npz", "--epochs", "1"),
                    key, f"empty: shape {shape} holds no {what}")


@pytest.mark.parametrize("probe_shape, object_shape, field", [
    ((0, 1, 32, 32), (1, 64, 64), "'probe'"),
    ((1, 1, 32, 32), (0, 64, 64), "'object'"),
])
def test_an_empty_product_probe_or_object_is_a_clear_error(tmp_path, probe_shape, object_shape,
                                                          field):
    product = tmp_path / "product.h5"
    with h5py.File(product, "w") as f:
        f["probe"] = np.ones(probe_shape, np.complex64)
        f["probe"].attrs["pixel_width_m"] = 1e-8
        obj = f.create_dataset("object", data=np.ones(object_shape, np.complex64))
        obj.attrs.update(pixel_width_m=1e-8, center_x_m=0.0, center_y_m=0.0)
        f["probe_position_x_m"] = np.zeros(3)
        f["probe_position_y_m"] = np.zeros(3)
    _one_line_error(_cli("probes", "add", "p", product, "--root", tmp_path / "lib"),
                    field, "empty: shape")
    assert not (tmp_path / "lib").exists()


# --- 6. a CXI mask of the wrong shape -----------------------------------------------------------

def test_a_cxi_mask_of_the_wrong_shape_is_a_clear_error(tmp_path):
    scan = write_cxi(_dataset(), tmp_path / "scan.cxi")
    with h5py.File(scan, "a") as f:
        mask = np.zeros((N + 1, N + 1), np.uint32)
        mask[0, 0] = 1
        f[f"{DETECTOR}/mask"] = mask
        f[f"{DETECTOR}/data"][0, 0, 0] = -1  # a flag value, which the mask would clear
    _one_line_error(_cli("reconstruct", scan, "-o", tmp_path / "r.npz", "--epochs", "1"),
                    f"{DETECTOR}/mask", f"expected shape ({N}, {N})", f"got ({N + 1}, {N + 1})")


# --- 7. import: a text file, zero frames, a group where an array is expected -------------------

def test_import_names_a_text_file_as_such(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("frames positions\n")
    _one_line_error(_cli("import", notes, tmp_path / "out.cxi", "--frames", "f", "--positions",
                         "p", *IMPORT_GEOMETRY), str(notes), "it holds text")
    _one_line_error(_cli("import", notes, tmp_path / "out.cxi"), "it holds text")


def test_import_refuses_zero_frames(tmp_path):
    src = tmp_path / "empty.h5"
    with h5py.File(src, "w") as f:
        f["f"] = np.zeros((0, N, N), "f4")
        f["p"] = np.zeros((0, 2))
    _one_line_error(_cli("import", src, tmp_path / "out.cxi", "--frames", "f", "--positions",
                         "p", *IMPORT_GEOMETRY), "'f'", "no frames", f"(0, {N}, {N})")
    assert not (tmp_path / "out.cxi").exists()


def test_import_refuses_a_key_that_names_a_group(tmp_path):
    src = tmp_path / "group.h5"
    with h5py.File(src, "w") as f:
        f["f"] = np.ones((4, N, N), "f4")
        f.create_group("p")
    _one_line_error(_cli("import", src, tmp_path / "out.cxi", "--frames", "f", "--positions",
                         "p", *IMPORT_GEOMETRY), "'p'", "expected a dataset, found Group")


# --- 8. probes add: an object array, -N 0, --root on a file -------------------------------------

def test_probes_add_refuses_an_object_array_probe(tmp_path):
    source = tmp_path / "objprobe.npz"
    np.savez(source, probeGuess=np.array([1, "a"], dtype=object), pixel_size_m=1e-8)
    _one_line_error(_cli("probes", "add", "p1", source, "--root", tmp_path / "lib"),
                    "'probeGuess'", "holds Python objects")


@pytest.mark.parametrize("source", ["probe.npy", "zone_plate"])
def test_probes_add_refuses_frame_size_zero(tmp_path, source):
    np.save(tmp_path / "probe.npy", np.ones((N, N), np.complex64))
    path = tmp_path / source if source.endswith(".npy") else source
    _one_line_error(_cli("probes", "add", "p2", path, "--root", tmp_path / "lib", "--pixel-m",
                         "1e-8", "-N", "0"), "--frame-size 0", "positive")
    assert not (tmp_path / "lib").exists()


def test_probes_add_refuses_a_root_that_is_a_file(tmp_path):
    np.save(tmp_path / "probe.npy", np.ones((N, N), np.complex64))
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_cli("probes", "add", "p4", tmp_path / "probe.npy", "--root", afile,
                         "--pixel-m", "1e-8"), str(afile), "is a file", "--root")
    assert afile.read_text() == "x"


def test_an_npz_whose_positions_are_in_metres_is_refused(tmp_path):
    # Before: every frame sat on one spot (metres read as pixels) and reconstruct exited 0
    # with a "reconstruction" of one probe footprint.
    ds = _dataset()
    path = tmp_path / "metres.npz"
    write_npz(ds, path)
    with np.load(path) as stored:  # as another program would write it: metres in xcoords
        arrays = dict(stored)
    for key in ("xcoords", "ycoords"):
        arrays[key] = (arrays[key] - N / 2 - 2) * 44e-9 + 20.0  # 6-px steps as metres
    np.savez(path, **arrays)
    _one_line_error(_cli("reconstruct", path, "-o", tmp_path / "o.npz", "--epochs", "1"),
                    "object pixels expected")


def test_reconstruct_never_writes_over_its_own_input(tmp_path):
    # Before: with --overwrite the result (or its PNG / JSON) replaced the measurement.
    path = write_cxi(_dataset(), tmp_path / "scan.cxi")
    before = path.read_bytes()
    _one_line_error(_cli("reconstruct", path, "-o", path, "--epochs", "1", "--overwrite"),
                    "would replace the input")
    assert path.read_bytes() == before
