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
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    frames = data["diffraction"].astype(np.float32)
    probe = data["probe"].astype(np.complex64)  # (M, N, N), unit norm
    positions = data["positions_px"].astype(np.float64) - 0.5  # see bench/_ptychi_runner.py
    height, width = (int(v) for v in data["object_shape"])
    options = {"rpie": api.RPIEOptions, "lsqml": api.LSQMLOptions}[engine]()
    options.data_options.fft_shift = True
    options.data_options.free_space_propagation_distance_m = float("inf")
    options.object_options.pixel_size_m = float(data["pixel_size_m"])
    options.object_options.optimizable = True
    options.object_options.determine_position_origin_coords_by = (
        api.ObjectPosOriginCoordsMethods.SPECIFIED
    )
    options.object_options.position_origin_coords = np.zeros(2)
    photons = frames.reshape(len(frames), -1).sum(1).mean()
    n = frames.shape[-1]
    probe_scaled = probe * np.sqrt(photons / n**2)
    options.probe_options.optimizable = bool(data["probe_update"])
    options.probe_position_options.optimizable = False
    options.reconstructor_options.num_epochs = 1
    options.reconstructor_options.batch_size = 16 if engine != "lsqml" else 64
    options.reconstructor_options.default_device = api.Devices.CPU
    options.reconstructor_options.random_seed = 0
    if engine == "rpie":
        options.object_options.step_size = 1.0
    return PtychographyTask(
        options,
        diffraction_data=frames,
        object_data=np.ones((1, height, width), dtype=np.complex64),
        probe_data=probe_scaled[None],
        probe_position_y_px=positions[:, 0],
        probe_position_x_px=positions[:, 1],
    )


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
