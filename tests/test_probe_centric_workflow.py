"""The paper's probe-centric workflow end to end, as a new beamline lives it (issue 12, section 2):

1. a first scan with a probe none of the shipped models know, written to a real Tiled server;
2. ``bluesky-ptychopinn calibrate RUN_UID`` recovers the probe (blind rPIE) into the library;
3. ``bluesky-ptychopinn train --probe NAME --register NAME`` trains a (tiny, seconds) model on
   synthetic objects with that probe and registers it;
4. the next scan, whose start document references the probe, is reconstructed live by that
   model (``LiveReconstruction(model="auto")``), and its derived run says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from typer.testing import CliRunner

from bluesky_ptychopinn.calibration import probe_correlation
from bluesky_ptychopinn.callbacks import LiveReconstruction
from bluesky_ptychopinn.cli import app
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.io import ProbeLibrary
from bluesky_ptychopinn.models import ModelRegistry
from bluesky_ptychopinn.models._checkpoint import read_model_card
from bluesky_ptychopinn.physics import kb_probe, wavelength_m
from bluesky_ptychopinn.plans import ptycho_scan

runner = CliRunner()
PROBE_NAME = "beamline_9_kb"
MODEL_NAME = "beamline9"


@pytest.fixture()
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("PTYCHOPINN_PROBE_LIBRARY", str(tmp_path / "probes"))
    monkeypatch.setenv("PTYCHOPINN_MODELS", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)  # calibrate writes its figure here
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(previous)


def _new_probe(geometry) -> np.ndarray:
    """An aberrated, defocused KB beam of its own numerical apertures: in no library, no
    shipped model."""
    dx = geometry.object_pixel_size_m
    na = wavelength_m(geometry.energy_ev) / (4 * dx)
    return kb_probe(geometry.frame_size, dx, geometry.energy_ev,
                    numerical_aperture=(0.8 * na, 0.75 * na), defocus_m=8 * dx / na,
                    astigmatism_waves=0.4, coma_waves=0.4)


def _scan(RE, bl, reference: str | None, side: int = 9, step_px: float = 4.0,
          pattern: str = "raster"):
    dx = bl.pixel_size_m
    (uid,) = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(reference),
                            pattern=pattern, extent_m=(step_px * dx * (side - 1),) * 2,
                            step_m=step_px * dx))
    return uid


def test_calibrate_train_and_the_next_scan_uses_the_new_model(tiled, places):
    base = sim_beamline("siemens_star", seed=0)
    probe = _new_probe(base.geometry)
    client = tiled.client()
    RE = RunEngine()
    RE.subscribe(TiledWriter(client, batch_size=50))

    # 1. the calibration scan: the probe is unknown to everyone
    bl = sim_beamline("siemens_star", probe=probe, write_path=tiled.detector_dir, seed=1,
                      photon_flux=2e8)
    # A fine step: blind ptychography needs ~70 % overlap or more (docs/calibration.md)
    raw_uid = _scan(RE, bl, None, side=14, step_px=3.0)

    # 2. calibrate from the run in Tiled
    done = runner.invoke(app, ["calibrate", raw_uid, "--tiled", tiled.uri, "--api-key",
                               tiled.api_key, "--name", PROBE_NAME, "--epochs", "60"],
                         catch_exceptions=False)
    assert done.exit_code == 0, done.output
    calibrated, meta = ProbeLibrary().get(PROBE_NAME)
    assert raw_uid in str(meta.get("provenance", meta))
    assert probe_correlation(calibrated, probe) > 0.95

    # 3. train a tiny model with it and register it
    trained = runner.invoke(app, [
        "train", str(places / "work" / MODEL_NAME), "--probe", PROBE_NAME, "--class",
        "dead_leaves", "--objects-per-class", "1", "--object-size", "96", "--channels", "1",
        "--base-width", "4", "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "8",
        "--register", MODEL_NAME], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    card = read_model_card(ModelRegistry().path(MODEL_NAME))
    probes = card["provenance"]["training_data"]["probes"]
    assert [p["name"] for p in probes] == [PROBE_NAME] and probes[0]["sha256"]

    # 4. the next scan references the calibrated probe: the model trained on it reconstructs
    live = LiveReconstruction(isolation="thread", refine=None, torch_threads=1)  # model="auto"
    docs: list = []
    live.subscribe(lambda name, doc: docs.append((name, doc)))
    live.subscribe(TiledWriter(client, batch_size=1))
    RE.subscribe(live)
    try:
        next_uid = _scan(RE, bl, PROBE_NAME)
        state = live.wait(next_uid, timeout=180)
    finally:
        live.close()
    start = next(d for n, d in docs if n == "start" and d["uid"] == state.derived_uid)
    stop = next(d for n, d in docs if n == "stop" and d["run_start"] == state.derived_uid)
    assert start["model"]["name"] == MODEL_NAME and start["model"]["trained_on_run_probe"]
    assert PROBE_NAME in start["model"]["chosen"]
    assert stop["exit_status"] == "success"
    assert client[state.derived_uid].start["model"]["name"] == MODEL_NAME
