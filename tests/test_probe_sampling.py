"""A probe of any size and pixel at the sampling a reconstruction needs (issue 12, section 1):
`physics.probe_at_sampling` against an analytic beam, and the commands that use it
(`probes add -N`, `reconstruct --probe`, the live run's probe reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bluesky_ptychopinn import physics
from bluesky_ptychopinn.callbacks._run_probe import resolve_run_probe
from bluesky_ptychopinn.cli import app
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.io import ProbeLibrary, PtychoDataset, read_dataset, write_dataset
from bluesky_ptychopinn.physics import probe_at_sampling
from bluesky_ptychopinn.synthetic import make_object

runner = CliRunner()
SIGMA_M = 0.35e-6  # beam width
CURVATURE = 4e11  # rad / m^2: a defocused (complex) beam


def beam(size: int, pixel_m: float) -> np.ndarray:
    """An analytic defocused Gaussian beam sampled at ``size`` px of ``pixel_m``, centred on
    pixel (size // 2, size // 2) as the conventions want: the independent reference."""
    c = (np.arange(size) - size // 2) * pixel_m
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    field = np.exp(-r2 / (2 * SIGMA_M**2) + 1j * CURVATURE * r2)
    return (field / np.linalg.norm(field)).astype(np.complex64)[None]


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(("given", "wanted"), [
    ((128, 20e-9), (64, 40e-9)),  # frames cropped 128 -> 64: the same field of view
    ((64, 40e-9), (96, 40e-9)),  # the same pixel, a larger field of view
    ((96, 40e-9), (64, 40e-9)),  # the same pixel, a smaller one (the beam fits)
    ((128, 20e-9), (100, 32e-9)),  # both: 80 px of 32 nm, then padded to 100
])
def test_a_probe_is_resampled_to_the_analytic_beam_at_the_new_sampling(given, wanted):
    out = probe_at_sampling(beam(*given), given[1], *wanted)
    assert out.shape == (1, wanted[0], wanted[0])
    assert agreement(out, beam(*wanted)) > 0.999
    assert np.isclose(np.sum(np.abs(out) ** 2), 1.0, atol=1e-3)


def test_samplings_without_an_exact_resampling_are_refused_with_the_reason():
    with pytest.raises(InvalidInputError, match="not a whole number"):
        probe_at_sampling(beam(16, 20e-9), 20e-9, 32, 37.6e-9)  # 8.5 px: no whole number
    with pytest.raises(InvalidInputError, match="cut off"):
        probe_at_sampling(beam(64, 40e-9) * 0 + 1, 40e-9, 32, 40e-9)  # flat: fills the frame
    with pytest.raises(InvalidInputError, match="unknown pixel size"):
        probe_at_sampling(beam(64, 40e-9), None, 32, 40e-9)
    assert probe_at_sampling(beam(64, 40e-9), None, 64, 40e-9).shape == (1, 64, 64)


@pytest.fixture()
def library(tmp_path, monkeypatch):
    monkeypatch.setenv("PTYCHOPINN_PROBE_LIBRARY", str(tmp_path / "probes"))
    return ProbeLibrary()


def test_probes_add_resamples_a_file_probe_and_needs_no_energy(tmp_path, library):
    source = tmp_path / "measured.npy"
    np.save(source, beam(128, 20e-9))
    missing = runner.invoke(app, ["probes", "add", "beamline", str(source)])
    assert missing.exit_code != 0 and "--pixel-m" in missing.output
    added = runner.invoke(app, ["probes", "add", "beamline", str(source), "--pixel-m", "20e-9",
                                "-N", "64"], catch_exceptions=False)
    assert added.exit_code == 0, added.output
    probe, meta = library.get("beamline")
    assert probe.shape == (1, 64, 64) and meta["pixel_size_m"] == pytest.approx(40e-9)
    assert meta["energy_ev"] is None and "128 px" in meta["provenance"]["resampled"]
    assert meta["source"] == str(source)
    assert agreement(probe, beam(64, 40e-9)) > 0.999
    listed = runner.invoke(app, ["probes", "list"], catch_exceptions=False)
    assert listed.exit_code == 0 and "unknown" in listed.output
    again = runner.invoke(app, ["probes", "add", "beamline", str(source), "--pixel-m", "2e-8"])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_reconstruct_uses_a_library_probe_at_the_scans_sampling(tmp_path, library):
    """A probe calibrated with 128-px frames at half the pixel reconstructs a 64-px scan: the
    run uses it resampled (recorded), and knowing the probe beats the file's poor guess."""
    obj = make_object("cells", (96, 96), seed=2)
    positions = physics.scan_pattern("raster", (30.0, 30.0), step=5.0) + 48
    geometry = physics.ExperimentGeometry(8_800, detector_distance_m=1.0)
    geometry_dx = geometry.object_pixel_size_m
    counts = physics.simulate_diffraction(obj, beam(64, geometry_dx), positions, photons=1e6,
                                          seed=0).counts.numpy()
    guess = np.ones((64, 64), np.complex64)  # a poor probe in the file
    path = write_dataset(PtychoDataset(counts, positions, guess, energy_ev=8_800,
                                       detector_distance_m=1.0, detector_pixel_size_m=75e-6,
                                       object=obj), tmp_path / "scan.cxi")
    library.add("calibrated", beam(128, geometry_dx / 2), pixel_size_m=geometry_dx / 2)
    scores = {}
    for name, extra in (("guess", []), ("calibrated", ["--probe", "calibrated"])):
        out = tmp_path / f"{name}.cxi"
        result = runner.invoke(app, ["reconstruct", str(path), "--epochs", "8",
                                     "--no-probe-update", "-o", str(out), *extra],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        scores[name] = json.loads(out.with_suffix(".json").read_text())["frc_auc_0.5_phase"]
    written = read_dataset(tmp_path / "calibrated.cxi")
    assert any("(--probe)" in c for c in json.dumps(written.metadata).split('"'))
    assert agreement(written.probe, beam(64, geometry_dx)) > 0.999
    assert scores["calibrated"] > scores["guess"] + 0.1, scores
    bad = runner.invoke(app, ["reconstruct", str(path), "--probe", "nowhere", "-o",
                              str(tmp_path / "x.cxi")])
    assert bad.exit_code != 0 and "--probe nowhere" in bad.output


def test_a_live_run_uses_a_referenced_probe_of_another_size_at_the_same_pixel(library):
    """The run's ``ptycho.probe`` names a library probe of 96 px at the run's pixel: the
    refiner gets it cropped in real space to the run's 64 px (it used to fall back to blind)."""
    library.add("wide", beam(96, 40e-9), pixel_size_m=40e-9)
    probe, info = resolve_run_probe({"probe": "wide"}, {}, 64, 40e-9, 8_800, library)
    assert info["known"] and probe.shape == (1, 64, 64)
    assert agreement(probe, beam(64, 40e-9)) > 0.999
