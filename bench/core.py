"""Core benchmarks: simulation, patch extract/scatter, ePIE/rPIE, and pty-chi side by side.

    .venv/bin/python bench/core.py [--threads 2] [--epochs 30] [--no-ptychi]

pty-chi (ePIE, rPIE, LSQML) runs on the same data in the same run when `.venv-bench` exists
(`make bench` creates it: pty-chi needs torchvision, which the main environment does not
carry). Results go to bench/results/core.json and the table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.metrics import compare_objects  # noqa: E402
from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct  # noqa: E402
from bluesky_ptychopinn.synthetic import make_object  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up (first torch calls allocate and pick kernels)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_physics(n_frames: int = 2000) -> dict:
    obj = make_object("dead_leaves", (512, 512), seed=0)
    probe = physics.make_probe("zone_plate", 64, 44e-9, 8_800)
    pos = np.random.default_rng(0).uniform(40, 470, size=(n_frames, 2))
    sim_s = timed(lambda: physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0))
    obj_t = torch.from_numpy(obj)
    pos_t = torch.from_numpy(pos).float()
    patches = physics.extract_patches(obj_t, pos_t, 64)
    ext_s = timed(lambda: physics.extract_patches(obj_t, pos_t, 64))
    sca_s = timed(lambda: physics.scatter_patches(patches, pos_t, (512, 512)))
    return {"simulate_frames_per_s": n_frames / sim_s, "extract_patches_per_s": n_frames / ext_s,
            "scatter_patches_per_s": n_frames / sca_s, "frames": n_frames, "frame_size": 64}


def dataset(seed: int = 0):
    """The pty-chi comparison case: 64x64 frames, Fermat spiral, ~300 positions, 256x256 object,
    1e6 photons, known probe (numbers in the reference: ePIE ~3-4 s for 50 epochs on 2 cores)."""
    obj = make_object("dead_leaves", (256, 256), seed=seed, amp_range=(0.7, 1.0),
                      phase_range=(-1.0, 1.0))
    probe = physics.make_probe("zone_plate", 64, 44e-9, 8_800)
    pos = physics.fermat_spiral_scan((150.0, 150.0), 7.5) + 128
    sim = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=seed)
    return obj, probe, pos, sim.counts.numpy()


def score(recon, truth, pos) -> dict:
    n = 64
    weight = physics.scatter_patches(torch.ones(len(pos), n, n), torch.from_numpy(pos).float(),
                                     truth.shape).numpy()
    covered = weight > 0.5 * weight.max()
    rows, cols = np.nonzero(covered)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    s = compare_objects(recon[box], truth[box], taper_px=10)
    return {"frc_auc_0.5_phase": s["frc_auc_0.5_phase"],
            "frc_auc_0.5_amplitude": s["frc_auc_0.5_amplitude"], "nrmse": s["nrmse"]}


def bench_ours(obj, probe, pos, frames, epochs: int) -> dict:
    out = {}
    for engine in ("epie", "rpie"):
        options = PIEOptions(engine=engine, n_epochs=epochs, probe_update=False, progress=False,
                             seed=0, device="cpu")
        pie_reconstruct(frames[:32], pos[:32], probe, object_shape=obj.shape,
                        options=PIEOptions(engine=engine, n_epochs=1, progress=False))
        t = time.perf_counter()
        result = pie_reconstruct(frames, pos, probe, object_shape=obj.shape, options=options)
        seconds = time.perf_counter() - t
        out[f"ours_{engine}"] = {"seconds": seconds, "seconds_per_epoch": seconds / epochs,
                                 **score(result.object, obj, pos)}
    return out


def bench_ptychi(obj, probe, pos, frames, epochs: int, threads: int) -> dict:
    python = ROOT / ".venv-bench" / "bin" / "python"
    if not python.exists():
        return {"ptychi": "skipped: .venv-bench missing (run `make bench`)"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.npz"
        np.savez(src, diffraction=frames, probe=probe, positions_px=pos,
                 object_shape=np.array(obj.shape), threads=threads, pixel_size_m=44e-9)
        for engine in ("epie", "rpie", "lsqml"):
            dst = Path(tmp) / f"{engine}.npz"
            # a 1-epoch run first keeps pty-chi's torch warm-up out of the timing
            cmd = [str(python), str(ROOT / "bench" / "_ptychi_runner.py"), str(src), str(dst),
                   engine, str(epochs)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                out[f"ptychi_{engine}"] = {"error": proc.stderr[-500:]}
                continue
            with np.load(dst) as res:
                out[f"ptychi_{engine}"] = {"seconds": float(res["seconds"]),
                                           "seconds_per_epoch": float(res["seconds"]) / epochs,
                                           **score(res["object"], obj, pos)}
    return out


def write_markdown(results: dict, path: Path) -> None:
    rows = [
        "| engine | epochs | time (s) | s/epoch | FRC-AUC(0-0.5) phase | NRMSE |",
        "|---|---|---|---|---|---|",
    ]
    for key, value in results["reconstruction"].items():
        if isinstance(value, dict) and "seconds" in value:
            rows.append(f"| {key} | {results['epochs']} | {value['seconds']:.2f} | "
                        f"{value['seconds_per_epoch']:.3f} | {value['frc_auc_0.5_phase']:.3f} | "
                        f"{value['nrmse']:.3f} |")
        else:
            rows.append(f"| {key} | | {value} | | | |")
    p = results["physics"]
    text = path.read_text() if path.exists() else "# Performance\n"
    marker = "<!-- core-bench -->"
    block = "\n".join([
        marker,
        "## Core benchmarks (`bench/core.py`)",
        "",
        f"Machine: {results['machine']}; torch threads: {results['threads']}; "
        f"measured {results['date']}.",
        "",
        f"- simulation: {p['simulate_frames_per_s']:.0f} frames/s (64x64, Poisson)",
        f"- patch extraction: {p['extract_patches_per_s']:.0f} patches/s; scatter (adjoint): "
        f"{p['scatter_patches_per_s']:.0f} patches/s",
        "",
        f"Reconstruction of one simulated scan ({results['positions']} positions, 64x64 frames, "
        "256x256 dead-leaves object, 1e6 photons, known probe), same data for every engine:",
        "",
        *rows,
        marker,
    ])
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--no-ptychi", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "threads": args.threads, "epochs": args.epochs,
               "date": time.strftime("%Y-%m-%d")}
    results["physics"] = bench_physics()
    obj, probe, pos, frames = dataset()
    results["positions"] = len(pos)
    recon = bench_ours(obj, probe, pos, frames, args.epochs)
    if not args.no_ptychi:
        recon.update(bench_ptychi(obj, probe, pos, frames, args.epochs, args.threads))
    results["reconstruction"] = recon
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "core.json").write_text(json.dumps(results, indent=2, default=float))
    write_markdown(results, ROOT / "docs" / "performance.md")
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
