"""docs/experiments/run.py (the paper's experiments in miniature) runs end to end.

The real run takes about an hour; ``--scale smoke`` trains every model of every experiment for a
handful of steps so the script, its tables and figures cannot silently rot.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_experiments_script_writes_every_table_and_figure(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "docs" / "experiments" / "run.py"), "--scale", "smoke",
         "--workers", "1", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = (tmp_path / "experiments.md").read_text()
    for heading in ("## 1. PS vs PE vs SS", "## 2. Probe-excluded single vs dual vs unified",
                    "## 3. Object-class effect", "## 4. Ablation"):
        assert heading in report
    for label in ("PS (synthetic, unsupervised)", "PE (one experiment's own data)",
                  "SS (synthetic, supervised)", "C = 1 (no overlap constraint)",
                  "C = 4, random order", "dead_leaves", "simplex"):
        assert label in report
    # Every FRC-AUC in the tables is a finite number in [-1, 1].
    values = [float(v) for v in re.findall(r"\| \**(-?\d\.\d{3})\** ", report)]
    assert len(values) > 30
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in values)
    for figure in ("experiments_1_frc.png", "experiments_3_frc.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 10_000


def test_crop_section_scores_the_same_network_with_every_crop(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "docs" / "experiments" / "run.py"), "--scale", "smoke",
         "--section", "crop", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = (tmp_path / "experiments" / "crop.md").read_text()
    assert report.startswith("## 6. Stitching crop")
    rows = [line for line in report.splitlines() if re.match(r"\| \d+", line)]
    assert [int(r.split()[1]) for r in rows] == [16, 24, 32, 40]
    for row in rows:
        values = [float(v) for v in re.findall(r"-?\d\.\d{3}", row)]
        assert len(values) == 3 and all(-1 <= v <= 1 for v in values)  # 2 samples + mean


def test_data_section_reports_both_crops_for_both_budgets(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "docs" / "experiments" / "run.py"), "--scale", "smoke",
         "--section", "data", "--workers", "1", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = (tmp_path / "experiments" / "data.md").read_text()
    assert report.startswith("## 7. Training data")
    rows = [line for line in report.splitlines() if line.startswith("| PS ")]
    assert len(rows) == 2
    for row in rows:
        values = [float(v) for v in re.findall(r"-?\d\.\d{3}", row)]
        assert len(values) == 6 and all(-1 <= v <= 1 for v in values)  # 2 crops x (2 + mean)


def test_long_section_takes_its_models_from_the_command_line(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "docs" / "experiments" / "run.py"), "--scale", "smoke",
         "--section", "long", "--long", "2x1,1x2", "--workers", "1", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = (tmp_path / "experiments" / "long.md").read_text()
    assert report.startswith("## 8. Longer training")
    rows = [line for line in report.splitlines() if line.startswith("| PS ")]
    assert [r.split("|")[1].strip() for r in rows] == ["PS 2x objects", "PS 1x objects, x2 steps"]
    # smoke scale: 1 object per class, steps (6, ...) -> 2 objects and 12 steps
    assert [int(r.split("|")[2]) for r in rows] == [2, 1]
    assert [int(r.split("|")[4]) for r in rows] == [6, 12]
    for row in rows:
        values = [float(v) for v in re.findall(r"-?\d\.\d{3}", row)]
        assert len(values) == 6 and all(-1 <= v <= 1 for v in values)


def test_regimes_section_compares_networks_with_rpie_at_equal_time(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "docs" / "experiments" / "run.py"), "--scale", "smoke",
         "--section", "regimes", "--workers", "1", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    report = (tmp_path / "experiments" / "regimes.md").read_text()
    assert report.startswith("## 9. Where the network wins")
    for heading in ("### Overlap sweep", "### Dose sweep", "### Sparse and dim at once",
                    "### Amplitude FRC-AUC", "### Network minus rPIE"):
        assert heading in report
    # smoke scale: overlaps (0.75, 0) at 1e6, doses (1e3, 1e6) at 0.75, one corner (0, 1e3)
    overlap_table = report.split("### Overlap sweep")[1].split("###")[0]
    rows = [line for line in overlap_table.splitlines() if re.match(r"\| \d", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["0.75", "0"]
    for row in rows:  # 3 networks and rPIE at each one's time, 1 epoch, converged
        values = [float(v) for v in row.split("|")[5:-1]]
        assert len(values) == 8 and all(-1 <= v <= 1 for v in values)
    (result,) = json.loads((tmp_path / "experiments" / "regimes.json").read_text())
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        # The overlap defines the step: 1 - step / probe diameter.
        assert math.isclose(row["step_px"], row["diameter_px"] * (1 - row["overlap"]))
        for net in ("C = 4 (default)", "C = 1", "C = 4 low-dose"):
            # rPIE got (at least) the network's wall time, and did some work in it.
            assert row["seconds"][f"rPIE @ {net}"] >= row["seconds"][net]
            assert row["epochs"][f"rPIE @ {net}"] > 0
        assert row["epochs"]["rPIE 1 epoch"] == 1
        assert math.isclose(row["epochs"]["rPIE converged"], 3)  # smoke: at most 3 epochs
