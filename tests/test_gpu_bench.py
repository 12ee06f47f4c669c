"""bench/gpu.sh's measurements (bench/gpu.py) run end to end on the CPU at toy sizes.

The GPU benchmark runs only where a GPU is lent; this keeps every stage of it working in CI:
``bench/gpu.py --device cpu --quick`` must write gpu.json with each stage's numbers (or, where a
stage breaks, its error), and an error recorded after a kill must keep what was measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.py"
STAGES = ("info", "tests", "network", "refiner", "live")


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _missing_numbers(name: str, rec: dict) -> list[str]:
    """What a stage that did not fail must have measured."""
    missing = []

    def need(label, value):
        if not _positive(value):
            missing.append(f"{name}.{label} = {value!r}")

    def rows(key, field):
        value = rec.get(key)
        if not isinstance(value, list) or not value:
            missing.append(f"{name}.{key}: no rows")
            return
        for row in value:
            need(f"{key}[{row.get('batch', row.get('batch_size', row.get('rate')))}].{field}",
                 row.get(field))

    if name == "info":
        need("cpu_count", rec.get("cpu_count"))
        if not str(rec.get("torch_version", "")):
            missing.append("info.torch_version")
        for key in ("gpu_name", "torch_cuda_version", "nvidia_smi"):
            if key not in rec:
                missing.append(f"info.{key} absent")
    elif name == "tests":
        need("total", rec.get("total"))
        for key in ("passed", "failed", "skipped", "errors"):
            if not isinstance(rec.get(key), int):
                missing.append(f"tests.{key}")
    elif name == "network":
        rows("eager_bf16", "groups_per_s")
        rows("eager_fp32", "groups_per_s")
        rows("streaming", "frames_per_s")
        compiled = rec.get("compile", {})
        if "skipped" not in compiled and not compiled.get("batches"):
            missing.append("network.compile: neither skipped nor measured")
    elif name == "refiner":
        rows("rpie", "epochs_per_s")
        sr = rec.get("streaming_refiner", {})
        if not (sr.get("available") is False or "epochs_per_s" in sr or sr.get("error")):
            missing.append(f"refiner.streaming_refiner: {sr!r}")
    elif name == "live":
        rows("rate_sweep", "reconstructed_frames_per_s")
        rows("runengine", "acquired_frames_per_s")
        if not isinstance(rec.get("max_rate_followed_frames_per_s"), (int, float)):
            missing.append("live.max_rate_followed_frames_per_s")
    return missing


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # one torch thread: on a shared 2-core machine two threads spin against each other
    out = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, json.loads((out / "gpu.json").read_text()), proc.stdout


def test_every_stage_has_its_numbers_or_an_error(quick_run):
    out, data, stdout = quick_run
    assert data["device"] == "cpu" and data["quick"] is True
    assert tuple(data["stages"]) == STAGES
    for name, rec in data["stages"].items():
        if rec.get("error"):
            assert rec["ok"] is False, (name, rec)
        else:
            assert rec["ok"] is True and rec["complete"] is True, (name, rec)
            assert _missing_numbers(name, rec) == [], rec
        assert _positive(rec["seconds"])
    assert (out / "pytest_cuda.log").read_text().strip()
    assert "max rate followed" in stdout  # the summary printed at the end


def test_on_the_cpu_no_stage_fails(quick_run):
    _, data, _ = quick_run
    errors = {name: rec["error"] for name, rec in data["stages"].items() if rec.get("error")}
    assert errors == {}
    tests = data["stages"]["tests"]
    # without a GPU every test of tests/test_cuda.py is skipped, and that is what is recorded
    assert tests["skipped"] == tests["total"] >= 1 and tests["failed"] == 0
    assert data["stages"]["network"]["device"] == "cpu"


def test_an_error_recorded_after_a_kill_keeps_the_numbers(quick_run, tmp_path):
    out, data, _ = quick_run
    (tmp_path / "gpu.json").write_text(json.dumps(data))
    run = [sys.executable, str(SCRIPT), "--out", str(tmp_path)]
    subprocess.run([*run, "--record-error", "live", "killed by its 55 s timeout"], check=True,
                   timeout=60)
    live = json.loads((tmp_path / "gpu.json").read_text())["stages"]["live"]
    assert live["ok"] is False and live["complete"] is False
    assert live["error"] == "killed by its 55 s timeout"
    assert live["rate_sweep"] == data["stages"]["live"]["rate_sweep"]
    summary = subprocess.run([*run, "--summary"], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 1 and "live: ERROR killed by its 55 s timeout" in summary.stdout
