"""Run one pty-chi engine on an NPZ written by bench/core.py (executed in the bench venv).

    python bench/_ptychi_runner.py IN.npz OUT.npz ENGINE EPOCHS

pty-chi is an optional peer: it needs torchvision, so it runs in its own virtual environment
(`make bench` creates `.venv-bench`), and the two sides exchange plain NPZ files.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch


def build_task(data, engine: str, epochs: int, probe_update: bool = False):
    """A pty-chi ``PtychographyTask`` for the NPZ ``data`` in this project's conventions."""
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    frames = data["diffraction"].astype(np.float32)
    probe = data["probe"].astype(np.complex64)  # (M, N, N), unit norm
    # pty-chi's pixel-index positions put a probe centre half a pixel lower than ours (its patch
    # of size N is centred at (N - 1) / 2, ours at N / 2): measured, the -0.5 offset maximises
    # the FRC of pty-chi's result against the truth (0.87 -> 0.97 phase FRC-AUC for rPIE).
    positions = data["positions_px"].astype(np.float64) - 0.5
    height, width = (int(v) for v in data["object_shape"])
    options = {
        "epie": api.EPIEOptions, "rpie": api.RPIEOptions, "lsqml": api.LSQMLOptions,
    }[engine]()
    options.data_options.fft_shift = True  # our frames have DC at the centre
    options.data_options.free_space_propagation_distance_m = float("inf")
    options.object_options.pixel_size_m = float(data["pixel_size_m"])
    options.object_options.optimizable = True
    # Positions are probe centres in pixels of the object array: origin (0, 0) = pixel (0, 0).
    options.object_options.determine_position_origin_coords_by = (
        api.ObjectPosOriginCoordsMethods.SPECIFIED
    )
    options.object_options.position_origin_coords = np.zeros(2)
    # pty-chi uses an unnormalised FFT: scale the unit-norm probe to the photon count.
    photons = frames.reshape(len(frames), -1).sum(1).mean()
    n = frames.shape[-1]
    probe_scaled = probe * np.sqrt(photons / n**2)
    options.probe_options.optimizable = bool(probe_update)
    options.probe_position_options.optimizable = False
    options.reconstructor_options.num_epochs = epochs
    options.reconstructor_options.batch_size = 16 if engine != "lsqml" else 64
    options.reconstructor_options.default_device = api.Devices.CPU
    options.reconstructor_options.random_seed = 0
    if engine in ("epie", "rpie"):
        options.object_options.step_size = 1.0
    return PtychographyTask(
        options,
        diffraction_data=frames,
        object_data=np.ones((1, height, width), dtype=np.complex64),
        probe_data=probe_scaled[None],
        probe_position_y_px=positions[:, 0],
        probe_position_x_px=positions[:, 1],
    )


def main(src: str, dst: str, engine: str, epochs: int) -> None:
    data = np.load(src)
    torch.set_num_threads(int(data["threads"]))
    task = build_task(data, engine, epochs)
    start = time.perf_counter()
    task.run()
    seconds = time.perf_counter() - start
    obj = task.get_data_to_cpu("object", as_numpy=True)[0]
    np.savez(dst, object=obj, seconds=seconds, epochs=epochs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
