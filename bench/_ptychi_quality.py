"""Run one pty-chi engine epoch by epoch on an NPZ written by bench/quality.py (in .venv-bench).

    python bench/_ptychi_quality.py IN.npz OUT.npz ENGINE BUDGET_S [MAX_EPOCHS]

Like bench/_ptychi_runner.py (same conventions: -0.5 px position offset, DC-centred frames,
unnormalised FFT so the unit-norm probe is scaled to the photon count), but the task runs one
epoch at a time until BUDGET_S seconds of ``task.run`` have passed, and the object inside the
scored box is kept after each epoch with the cumulative seconds of ``task.run`` alone (copying
the object out is not timed). The probe is refined when ``probe_update`` is set (blind scans),
from the same start the other methods get; positions are never corrected.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch


def build(data, engine: str):
    """One-epoch task (``run(1)`` advances it an epoch), probe refined for blind scans."""
    from _ptychi_runner import build_task  # bench/ is on sys.path: this script's folder

    return build_task(data, engine, epochs=1, probe_update=bool(data["probe_update"]))


def main(src: str, dst: str, engine: str, budget_s: float, max_epochs: int = 2000) -> None:
    logging.disable(logging.WARNING)
    data = np.load(src)
    torch.set_num_threads(int(data["threads"]))
    y0, y1, x0, x1 = (int(v) for v in data["box"])
    # Warm-up on a few frames: torch's first calls (allocation, kernel choice) stay untimed,
    # as they do for the methods of the main environment.
    warm = {k: data[k] for k in data.files}
    warm["diffraction"] = data["diffraction"][:32]
    warm["positions_px"] = data["positions_px"][:32]
    build(warm, engine).run(1)
    t = time.perf_counter()
    task = build(data, engine)
    setup_s = time.perf_counter() - t
    seconds, epochs, objects = [], [], []
    busy = 0.0
    for epoch in range(1, max_epochs + 1):
        t = time.perf_counter()
        task.run(1)
        busy += time.perf_counter() - t
        obj = task.get_data_to_cpu("object", as_numpy=True)[0]
        seconds.append(busy)
        epochs.append(epoch)
        objects.append(obj[y0:y1, x0:x1].astype(np.complex64))
        if busy >= budget_s:
            break
    np.savez(dst, seconds=np.array(seconds), epochs=np.array(epochs), objects=np.stack(objects),
             setup_s=setup_s)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]),
         *(int(v) for v in sys.argv[5:6]))
