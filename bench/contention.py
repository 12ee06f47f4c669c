"""What a second engine on the second core costs rPIE on this machine.

    .venv/bin/python bench/contention.py [--repeats 2]

Times ``bench/quality.py``'s method (b) (rPIE from a flat start, 1 torch thread, scan A) to
complex FRC-AUC 0.8, alone and while another *process* (no shared interpreter lock) runs the
network over 1,000 frames in a loop on 1 torch thread, alternately; writes
``bench/results/contention.json``. Whatever slows (b) here is the hardware (two vCPUs sharing
caches and memory bandwidth), not the GIL: it bounds how close a hybrid that runs the network
beside the refiner can get to (b) on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402
from core import machine  # noqa: E402

NETWORK_LOOP = """
import time
import numpy as np, torch
torch.set_num_threads(1)
from bluesky_ptychopinn.models import ModelRegistry
from bluesky_ptychopinn.recon import StreamingReconstructor
model, _ = ModelRegistry().load("default", device="cpu")
rng = np.random.default_rng(0)
frames = rng.poisson(50, (1000, 64, 64)).astype(np.float32)
positions = rng.random((1000, 2)) * 150 + 40
print("ready", flush=True)
while True:
    recon = StreamingReconstructor(model, object_shape=(236, 236), batch_size=128, device="cpu")
    for lo in range(0, 1000, 128):
        recon.add(frames[lo : lo + 128], positions[lo : lo + 128])
        recon.snapshot()
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from bluesky_ptychopinn.models import ModelRegistry

    model, _ = ModelRegistry().load("default", device="cpu")
    scan = quality.build_scans(False)[0]
    torch.set_num_threads(1)
    quality.run_rpie_flat(model, scan, 1.0)  # warm-up
    rows = []
    for _ in range(args.repeats):
        loop = subprocess.Popen([sys.executable, "-c", NETWORK_LOOP], stdout=subprocess.PIPE,
                                text=True)
        loop.stdout.readline()
        beside = quality.run_rpie_flat(model, scan, 4.0)
        loop.kill()
        loop.wait()
        alone = quality.run_rpie_flat(model, scan, 4.0)
        rows.append({"alone_to_0.8_s": quality.time_to(alone["points"]),
                     "beside_network_process_to_0.8_s": quality.time_to(beside["points"]),
                     "alone_epochs_4s": alone["points"][-1]["epochs"],
                     "beside_epochs_4s": beside["points"][-1]["epochs"]})
        print(rows[-1], flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "command": "bench/contention.py", "scan": scan.label, "rows": rows}
    out = ROOT / "bench" / "results" / "contention.json"
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
