"""One RunEngine in its own process for ``bench/live.py``'s slow-down measurement.

    python bench/_scan_worker.py --isolation {none,thread,process,process-network} --points 400 \
        --exposure 0.005

``thread`` and ``process`` run the network and the refinement tier (the default);
``process-network`` the network alone (``refine=None``), for comparison.

Sets up once (imports, the callback and its reconstruction process), prints ``ready``, then for
every ``scan`` line on stdin runs one timed step scan and prints one JSON line: the scan's wall
time and, with a callback, how the reconstruction ended (waited for *after* the timing, so that
it never overlaps the next timed scan of any worker). ``quit`` closes the callback and exits.

Each configuration lives in its own interpreter so that none inherits another's heap, threads
or torch state; the parent interleaves them so that a drift of the machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolation", required=True,
                        choices=("none", "thread", "process", "process-allcores",
                                 "process-network"))
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--exposure", type=float, default=0.0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from bluesky import RunEngine

    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.devices import sim_beamline
    from bluesky_ptychopinn.plans import ptycho_scan

    torch.set_num_threads(1)  # the simulated detector's, the same in every configuration
    live = None
    if args.isolation != "none":
        # process: the default (one core kept for the RunEngine); process-allcores: the
        # reconstruction process may use every core; process-network: refinement off.
        isolation, _, variant = args.isolation.partition("-")
        extra = {"reserve_cores": 0 if variant == "allcores" else 1} if isolation == "process" \
            else {}
        live = LiveReconstruction("default", batch_size=32, torch_threads=1,
                                  isolation=isolation,
                                  refine=None if variant == "network" else "rpie", **extra)
    side = int(np.sqrt(args.points))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "scan":
            break
        bl = sim_beamline("cells", write_path=None)
        bl.detector.dead_time = args.exposure  # an exposure: the RunEngine waits on it
        RE = RunEngine()
        if live is not None:
            RE.subscribe(live)
        dx = bl.pixel_size_m
        t = time.perf_counter()
        RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(), pattern="raster",
                       extent_m=(4 * dx * (side - 1),) * 2, step_m=4 * dx))
        seconds = time.perf_counter() - t
        result = {"seconds": seconds, "points": side * side}
        if live is not None:
            state = live.wait(timeout=600)
            result.update(frames_done=state.frames_done, failed=state.failed)
        print(json.dumps(result), flush=True)
    if live is not None:
        live.close()


if __name__ == "__main__":
    main()
