"""The CLI's answers to common mistakes and its output files (review recon2, items 4-8, 12,
14-16): one-line errors (exit 2) before any long work, strict JSON, options that would be
ignored refused, and `evaluate` scoring an engine as `reconstruct` does.

The commands run in a fresh interpreter through the console entry point (``main``), as a user
runs them: a traceback, the exit status and stdout are then the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bluesky_ptychopinn.calibration import _overlap
from bluesky_ptychopinn.io import write_dataset
from bluesky_ptychopinn.physics import ExperimentGeometry, make_probe
from bluesky_ptychopinn.synthetic import simulate_experiment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Enough epochs that a check made after the reconstruction (the old behaviour) cannot finish
#: within ``_QUICK_S``: an error inside it shows the check came first.
_LONG_EPOCHS = "100000"
_QUICK_S = 60


def _cli(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``bluesky-ptychopinn ARGS`` in a fresh interpreter (one torch thread: 2 shared
    cores), with an empty probe library."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    if cwd is not None:
        env["PTYCHOPINN_PROBE_LIBRARY"] = str(cwd / "probes")
    return subprocess.run(
        [sys.executable, "-c", "from bluesky_ptychopinn.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed cleanly: exit 2, no traceback, one ``error:`` line holding every
    needle. Returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A small 64-px scan (the shipped model's N) with its truth, as an NPZ."""
    ds = simulate_experiment("dead_leaves", "zone_plate", geometry=ExperimentGeometry(),
                             object_shape=(112, 112), seed=1)
    return write_dataset(ds, tmp_path_factory.mktemp("scan") / "scan.npz")


@pytest.fixture(scope="module")
def amplitude_only(tmp_path_factory) -> Path:
    """The same kind of scan with a pure-amplitude truth: its phase scores are NaN."""
    ds = simulate_experiment("dead_leaves", "zone_plate", geometry=ExperimentGeometry(),
                             object_shape=(112, 112), seed=2)
    ds.object = np.abs(ds.object).astype(np.complex64)
    return write_dataset(ds, tmp_path_factory.mktemp("amp") / "amp.npz")


def _strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity, as jq and JavaScript do."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


# --- item 4: NaN scores ----------------------------------------------------------------------

def test_nan_scores_are_written_as_null_in_strict_json(amplitude_only, tmp_path):
    out = tmp_path / "amp_recon.npz"
    result = _cli("reconstruct", str(amplitude_only), "--model", "default", "-o", str(out))
    assert result.returncode == 0, result.stderr
    printed = _strict_json(result.stdout)
    written = _strict_json(out.with_suffix(".json").read_text())
    # a constant (zero) reference phase has no phase score: null, not a bare NaN
    assert printed["frc_auc_0.5_phase"] is None and written["frc_auc_0.5_phase"] is None
    assert written["nrmse"] is not None and np.isfinite(written["nrmse"])
    # the iterative engine's progress bar (drawn on stdout) is for terminals only: piped,
    # stdout is the summary alone
    iterative = _cli("reconstruct", str(amplitude_only), "--epochs", "1", "-o",
                     str(tmp_path / "it.npz"))
    assert iterative.returncode == 0, iterative.stderr
    assert _strict_json(iterative.stdout)["method"] == "rpie, 1 epochs"


# --- item 5: evaluate --engine ------------------------------------------------------------------

def test_evaluate_scores_an_engine_inside_its_covered_box_as_reconstruct_does(scan, tmp_path):
    table = _cli("evaluate", str(scan), "--engine", "rpie", "--epochs", "4")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "│ rpie" in line)
    phase, amplitude, nrmse = (float(cell) for cell in row.split("│")[3:6])
    out = tmp_path / "r.npz"
    single = _cli("reconstruct", str(scan), "--epochs", "4", "-o", str(out))
    assert single.returncode == 0, single.stderr
    summary = json.loads(out.with_suffix(".json").read_text())
    # same engine, epochs and seed: the same numbers (the table rounds to 3 decimals)
    assert phase == pytest.approx(summary["frc_auc_0.5_phase"], abs=1.5e-3), row
    assert amplitude == pytest.approx(summary["frc_auc_0.5_amplitude"], abs=1.5e-3), row
    assert nrmse == pytest.approx(summary["nrmse"], abs=1.5e-3), row


# --- item 6: output paths -------------------------------------------------------------------

def test_an_output_under_a_file_is_refused_before_any_work(scan, tmp_path):
    blocker = tmp_path / "notes.npz"
    blocker.write_text("a file")
    start = time.perf_counter()
    result = _cli("reconstruct", str(scan), "--epochs", _LONG_EPOCHS, "-o",
                  str(blocker / "out.npz"), timeout=_QUICK_S)
    _one_line_error(result, "--output", "is a file, not a directory")
    assert time.perf_counter() - start < _QUICK_S


def test_an_output_that_is_a_directory_is_refused_before_any_work(scan, tmp_path):
    folder = tmp_path / "adir.npz"
    folder.mkdir()
    result = _cli("reconstruct", str(scan), "--epochs", _LONG_EPOCHS, "-o", str(folder),
                  "--overwrite", timeout=_QUICK_S)
    _one_line_error(result, "--output", "is a directory")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_an_unwritable_output_directory_is_refused_before_any_work(scan):
    # sysfs refuses new files even to root, where permission bits would not
    result = _cli("reconstruct", str(scan), "--epochs", _LONG_EPOCHS, "-o", "/sys/out.npz",
                  timeout=_QUICK_S)
    _one_line_error(result, "--output /sys/out.npz", "cannot write in /sys")
    assert not Path("/sys/out.npz").exists()


def test_simulate_creates_the_output_directory_and_refuses_a_directory(tmp_path):
    nested = tmp_path / "new" / "sub" / "sim.npz"
    result = _cli("simulate", str(nested), "--object-size", "64", "--frame-size", "16")
    assert result.returncode == 0, result.stderr
    assert nested.is_file()
    folder = tmp_path / "adir.npz"
    folder.mkdir()
    _one_line_error(_cli("simulate", str(folder), "--object-size", "64", "--frame-size", "16"),
                    "is a directory")


# --- item 7: --device cuda without CUDA --------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(scan, tmp_path):
    _one_line_error(_cli("reconstruct", str(scan), "--device", "cuda", "--epochs", "1", "-o",
                         str(tmp_path / "r.npz")), "--device cuda", "no CUDA device")
    assert not (tmp_path / "r.npz").exists()
    # the worker refuses it before it connects (the bus here is unreachable)
    _one_line_error(_cli("worker", "--bus", "nats://127.0.0.1:1", "--tiled",
                         "http://127.0.0.1:1", "--device", "cuda", "--max-runs", "1"),
                    "--device cuda", "no CUDA device")


# --- item 8: options that would be ignored ---------------------------------------------------

@pytest.mark.parametrize(("args", "flag"), [
    (["--refine"], "--refine"),
    (["--refine-seconds", "3"], "--refine-seconds"),
    (["--crop", "16"], "--crop"),
    (["--model", "default", "--engine", "epie"], "--engine"),
    (["--model", "default", "--refine-seconds", "3"], "--refine-seconds"),
])
def test_options_the_chosen_method_would_ignore_are_refused(scan, tmp_path, args, flag):
    out = tmp_path / "r.npz"
    _one_line_error(_cli("reconstruct", str(scan), "--epochs", "1", "-o", str(out), *args),
                    flag)
    assert not out.exists()


def test_the_refinement_runs_the_engine_asked_for(scan, tmp_path):
    out = tmp_path / "r.npz"
    result = _cli("reconstruct", str(scan), "--model", "default", "--refine", "--engine",
                  "epie", "--epochs", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["refinement"]["engine"] == "epie"
    assert "+ epie" in summary["method"]


# --- item 12: calibration overlap ----------------------------------------------------------

def test_the_calibration_overlap_ignores_repeated_positions():
    probe = make_probe("zone_plate", 64, 30e-9, 8800)
    grid = np.stack(np.meshgrid(np.arange(8) * 40.0, np.arange(8) * 40.0, indexing="ij"),
                    -1).reshape(-1, 2)
    single = _overlap(grid, probe)
    assert single["median_step_px"] == pytest.approx(40.0)
    jitter = np.random.default_rng(0).normal(0, 0.05, grid.shape)  # encoder read-back noise
    for repeated in (np.concatenate([grid, grid]), np.concatenate([grid, grid + jitter]),
                     np.concatenate([grid] * 12)):  # more repeats than the first query's k
        twice = _overlap(repeated, probe)
        assert twice["median_step_px"] == pytest.approx(40.0, abs=0.2), twice
        assert twice["linear_overlap"] == pytest.approx(single["linear_overlap"], abs=0.01)
    # one setpoint, many frames: no neighbour, hence no overlap (the warning fires)
    assert _overlap(np.zeros((5, 2)), probe)["linear_overlap"] == 0.0


# --- item 14: a cropping model's canvas --------------------------------------------------------

def test_a_cropping_model_gets_a_canvas_of_its_own_grid():
    """128-px frames, a 64-px model: the model's pixel is twice the dataset's, so its canvas
    covers the scan at that pixel, not the dataset's object shape (4x the area, empty)."""
    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn._workflows import reconstruct_with_model, reference_on_grid
    from bluesky_ptychopinn.models import ModelRegistry

    geometry = ExperimentGeometry()
    p64 = physics.make_probe("zone_plate", 64, geometry.object_pixel_size_m, geometry.energy_ev)
    ds = simulate_experiment("dead_leaves", physics.resample_probe(p64, 128),
                             geometry=ExperimentGeometry(frame_size=128),
                             object_shape=(192, 192), seed=3)
    net = ModelRegistry().load("default", device="cpu")[0]
    snap = reconstruct_with_model(ds, net, device="cpu", crop=24)
    # the dataset's field of view (192 px) at the model's pixel (twice the dataset's), with
    # at most the canvas's few pixels of margin around the patches
    assert all(96 <= side <= 100 for side in snap.object.shape), snap.object.shape
    covered = snap.weight > 0
    # 18 frames stitched with a 24-px crop cover ~1/4 of the field (1/16 of the old canvas)
    assert covered.mean() > 0.15, covered.mean()
    truth = reference_on_grid(ds.object, ds.frame_size, snap, 64)
    assert truth.shape == snap.object.shape


# --- item 15: the JSON sidecar ---------------------------------------------------------------

def test_an_existing_json_sidecar_is_not_replaced_without_overwrite(scan, tmp_path):
    out = tmp_path / "side.npz"
    notes = out.with_suffix(".json")
    notes.write_text('{"my": "notes"}')
    _one_line_error(_cli("reconstruct", str(scan), "--epochs", "1", "-o", str(out)),
                    str(notes), "--overwrite")
    assert notes.read_text() == '{"my": "notes"}' and not out.exists()


# --- item 16: messages ----------------------------------------------------------------------

def test_a_text_file_named_npz_is_called_what_it_is(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a dataset\n")
    line = _one_line_error(_cli("reconstruct", str(text), "-o", str(tmp_path / "r.npz")),
                           "not a readable NPZ file: it holds text")
    assert "pickle" not in line


def test_calibrate_on_a_directory_says_so(tmp_path):
    folder = tmp_path / "adir.npz"
    folder.mkdir()
    line = _one_line_error(_cli("calibrate", str(folder), "--root", str(tmp_path / "lib"),
                                cwd=tmp_path), "a directory")
    assert "no such file" not in line
