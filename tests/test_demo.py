"""The demo (``make demo``), smaller: embedded Tiled over HTTP, simulated beamline writing
HDF5, feedback scan with live reconstruction, everything read back from Tiled."""

from __future__ import annotations

import json

from rich.console import Console

from bluesky_ptychopinn.demo import run_demo


def test_demo_runs_end_to_end_and_reports_what_it_stored(tmp_path):
    console = Console(file=open(tmp_path / "console.txt", "w"), width=120)  # noqa: SIM115
    summary = run_demo(tmp_path, budget=160, console=console)
    console.file.close()
    assert summary["frames"] <= 160 and summary["frames"] >= 100
    assert summary["derived_exit_status"] == "success"
    assert summary["feedback"]["decisions"] >= 1
    assert sum(summary["frames_per_iteration"].values()) == summary["frames"]
    # a reconstruction of the hidden sample, not noise (the full demo scores ~0.4)
    assert summary["frc_auc_0.5_phase"] > 0.15
    assert (tmp_path / "demo.png").stat().st_size > 50_000
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    printed = (tmp_path / "console.txt").read_text()
    assert summary["derived_uid"] in printed and "bluesky-ptychopinn serve" in printed
