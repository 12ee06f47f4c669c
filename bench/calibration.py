"""The numbers of docs/calibration.md: the documented commands, and the probe they recover.

    OMP_NUM_THREADS=1 .venv/bin/python bench/calibration.py [WORKDIR]

Runs ``bluesky-ptychopinn simulate`` (a Siemens star under an Airy beam, 80 % overlap) and
``bluesky-ptychopinn calibrate --probe-guess data`` in WORKDIR (default a temporary directory).
Prints the frames, the seconds, the final Fourier error and the correlation of the guess and of
the calibrated probe with the true one (sub-pixel shift and global phase removed).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bluesky_ptychopinn.calibration import probe_correlation
from bluesky_ptychopinn.io import ProbeLibrary, read_dataset
from bluesky_ptychopinn.recon import probe_from_frames


def main(workdir: Path) -> dict:
    cli = [sys.executable, "-c", "from bluesky_ptychopinn.cli import main; main()"]
    subprocess.run(cli + ["simulate", "star.cxi", "--object", "siemens_star", "--probe", "airy",
                          "--object-size", "160", "--overlap", "0.8"], cwd=workdir, check=True)
    done = subprocess.run(cli + ["calibrate", "star.cxi", "--name", "my-beam", "--probe-guess",
                                 "data", "--root", "probes", "--device", "cpu", "--overwrite"],
                          cwd=workdir, check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    truth = read_dataset(workdir / "star.cxi")
    probe, meta = ProbeLibrary(workdir / "probes").get("my-beam")
    return {
        "frames": summary["frames"], "seconds": summary["seconds"],
        "final_fourier_error": summary["final_fourier_error"],
        "correlation_guess": probe_correlation(probe_from_frames(truth.diffraction),
                                               truth.probe),
        "correlation_calibrated": probe_correlation(probe, truth.probe),
        "linear_overlap": meta["provenance"]["settings"]["linear_overlap"],
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1:
        folder = Path(sys.argv[1])
        folder.mkdir(parents=True, exist_ok=True)
        print(json.dumps(main(folder), indent=2))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(main(Path(tmp)), indent=2))
