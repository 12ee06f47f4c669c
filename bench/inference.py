"""Inference throughput of the shipped default model (frames/s, 64x64) through the streaming
engine, the path every live frame takes, plus the bare network for reference.

    .venv/bin/python bench/inference.py [--threads 2] [--batch 256] [--frames 4096]
    .venv/bin/python bench/inference.py --scaling [--points 1000 10000 30000 100000]

``--scaling`` instead measures how the engine's cost per frame evolves along one long scan:
frames/s over a window of batches and the process RSS at each point (1k, 10k, 30k, 100k
frames), for the engine, for the engine with a frame budget (``--budget-mb``, default 256 MiB:
``StreamingReconstructor(frame_memory_bytes=...)``) and, up to ``--old-up-to`` frames (30k),
for the full-history path it replaced. Each engine
streams in its own process, so one's memory does not show in the other's RSS. The result goes
into the ``scaling`` entry of bench/results/inference.json; the other entries are kept.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.models import ModelRegistry  # noqa: E402
from bluesky_ptychopinn.recon import StreamingReconstructor  # noqa: E402
from bluesky_ptychopinn.synthetic import make_object  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from core import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--frames", type=int, default=4096)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (bf16 autocast, channels_last)")
    parser.add_argument("--scaling", action="store_true",
                        help="frames/s and RSS at --points frames along one long scan")
    parser.add_argument("--points", type=int, nargs="+",
                        default=[1_000, 10_000, 30_000, 100_000])
    parser.add_argument("--window", type=int, default=2048,
                        help="frames timed at each point (--scaling)")
    parser.add_argument("--unique", type=int, default=4096,
                        help="distinct simulated frames, reused along the scan (--scaling)")
    parser.add_argument("--old-up-to", type=int, default=30_000,
                        help="largest point measured for the full-history path (--scaling)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per engine, alternating; the fastest counts (--scaling)")
    parser.add_argument("--full", action="store_true",
                        help="run every frame through the network, not only the timed "
                        "windows (--scaling; slow)")
    parser.add_argument("--budget-mb", type=int, default=256,
                        help="frame memory of the 'budget' engine: the grid-hash engine with "
                        "StreamingReconstructor(frame_memory_bytes=...) (--scaling)")
    parser.add_argument("--engine", choices=["new", "budget", "old"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.engine:  # one engine's scaling run, in a process of its own
        print(json.dumps(scaling_run(args, device)))
        return
    if args.scaling:
        scaling(args, device)
        return
    model, card = ModelRegistry().load(args.model)
    n = model.config.frame_size
    obj = make_object("cells", (512, 512), seed=0)
    probe = physics.make_probe("zone_plate", n, 44e-9, 8_800)
    pos = physics.fermat_spiral_scan((400.0, 400.0), 400 / np.sqrt(args.frames)) + 256
    pos = pos[: args.frames]
    frames = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0).counts

    # Bare network (groups of C frames in, patches out).
    c = model.config.channels
    usable = min(args.batch, len(frames) // c) * c  # whole groups of C frames
    batch = frames[:usable].reshape(-1, c, n, n).to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def network_groups_per_s(memory_format) -> float:
        net = model.to(device).to(memory_format=memory_format)
        x = batch.contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            net.forward_parts(x, 0.1)
            sync()
            t = time.perf_counter()
            repeats = 20 if cuda else 5
            for _ in range(repeats):
                net.forward_parts(x, 0.1)
            sync()
            return repeats * x.shape[0] / (time.perf_counter() - t)

    # side by side: the layout the streaming engine uses (channels_last) and torch's default
    net_fps_contiguous = network_groups_per_s(torch.contiguous_format)
    net_fps = network_groups_per_s(torch.channels_last)

    # Streaming engine: network + grouping + stitching, every frame anchoring one group.
    def stream():
        recon = StreamingReconstructor(model, object_shape=(512, 512), batch_size=args.batch,
                                       device=device)
        start = time.perf_counter()
        for lo in range(0, len(pos), args.batch):
            recon.add(frames[lo : lo + args.batch], pos[lo : lo + args.batch])
        recon.finish()
        sync()
        return len(pos) / (time.perf_counter() - start), recon.stats()

    stream()  # warm-up
    fps, stats = max((stream() for _ in range(2)), key=lambda r: r[0])
    result = {
        "machine": machine(), "threads": args.threads, "device": str(device), "batch": args.batch,
        "frames": len(pos), "model": args.model, "channels": c,
        "parameters": card.get("n_parameters"),
        "network_groups_per_s": net_fps,
        "network_groups_per_s_contiguous": net_fps_contiguous,
        "streaming_frames_per_s": fps,
        "batch_latency_p50_s": stats["batch_latency_p50_s"],
        "date": time.strftime("%Y-%m-%d"),
    }
    path = _result_path(device)
    if path.exists():  # keep the --scaling entry of an earlier run
        previous = json.loads(path.read_text())
        if "scaling" in previous:
            result["scaling"] = previous["scaling"]
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _result_path(device: torch.device) -> Path:
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    return out / ("inference_cuda.json" if device.type == "cuda" else "inference.json")


def rss_mib() -> float:
    """Resident set size of this process (psutil when installed, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**10
    return float("nan")


def _trimmed_rss() -> float:
    """RSS after handing glibc's free heap memory back (NaN without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return float("nan")
    return rss_mib()


def scaling_run(args, device: torch.device) -> dict:
    """Stream one long scan through one engine; frames/s and RSS at each point.

    ``--unique`` frames are simulated once and reused in turn; the positions come from one
    Fermat spiral large enough for the last point, so every frame has a position of its own
    (the grouping and the frame store see a real 100k-point scan). Only the ``add`` calls of
    the ``--window`` frames after each point are timed, through the whole path. Between
    windows the scan is fast-forwarded (unless ``--full``): ``add`` runs with the network and
    the stitching switched off (their cost per frame does not depend on the scan length), so
    the engine's state at each point (grid hash and frame store; the old engine's lists) and
    hence its cost and memory are what a full run would have; the canvas is allocated for
    the whole scan either way.

    frames/s is wall time (what a live scan sees); frames per CPU-second (both threads) is
    less disturbed when other work shares the cores. RSS is read twice after each window: as
    is, and after glibc's ``malloc_trim(0)``. The difference is freed memory glibc keeps in its
    heap (its mmap threshold adapts upwards, and the engine's short-lived arrays then come from
    the heap); the second figure is what the process holds.
    """
    from bluesky_ptychopinn.recon._streaming import _FullHistoryReconstructor

    model, _ = ModelRegistry().load(args.model)
    n = model.config.frame_size
    step = 400 / np.sqrt(args.unique)  # the spacing of the default benchmark
    obj = make_object("cells", (512, 512), seed=0)
    probe = physics.make_probe("zone_plate", n, 44e-9, 8_800)
    sim_pos = physics.fermat_spiral_scan((400.0, 400.0), step)[: args.unique] + 256
    frames = physics.simulate_diffraction(obj, probe, sim_pos, photons=1e6, seed=0).counts
    unique = len(frames)  # the 400 x 400 spiral holds ~pi/4 of --unique points
    points = sorted(p for p in args.points
                    if args.engine != "old" or p <= args.old_up_to)
    total = max(args.points) + args.window  # the same scan and canvas for both engines
    radius = step * np.sqrt(total / np.pi) * 1.01 + step
    pos = physics.fermat_spiral_scan((2 * radius, 2 * radius), step)[:total]
    assert len(pos) == total, (len(pos), total)
    pos = pos - pos.min(axis=0) + n  # canvas coordinates, a frame's margin on every side
    shape = tuple(int(np.ceil(v)) + n for v in pos.max(axis=0))
    engine = _FullHistoryReconstructor if args.engine == "old" else StreamingReconstructor
    extra = {"frame_memory_bytes": args.budget_mb << 20} if args.engine == "budget" else {}
    recon = engine(model, object_shape=shape, batch_size=args.batch, device=device, **extra)
    rss_start = rss_mib()
    rows, seen, start = [], 0, time.perf_counter()

    def forward(batch, where) -> None:
        """add() without the network and the stitching (unless --full): the grouping, the
        frame store (the old engine's concatenation) and everything they keep run as usual."""
        if args.full or recon.input_scale is None:
            recon.add(batch, where)
            return
        recon._infer_and_stitch = lambda members, positions: None
        try:
            recon.add(batch, where)
        finally:
            del recon._infer_and_stitch  # the class's method again

    for point in points:
        while seen < point:  # untimed: the scan up to this point
            hi = min(seen + args.batch, point)
            forward(frames[np.arange(seen, hi) % unique], pos[seen:hi])
            seen = hi
        busy, cpu, latencies = 0.0, 0.0, []
        while seen < point + args.window:
            hi = min(seen + args.batch, point + args.window)
            batch = frames[np.arange(seen, hi) % unique]
            t, c = time.perf_counter(), time.process_time()
            recon.add(batch, pos[seen:hi])
            cpu += time.process_time() - c
            latencies.append(time.perf_counter() - t)
            busy += latencies[-1]
            seen = hi
        row = {"frames": point, "frames_per_s": args.window / busy,
               "frames_per_cpu_s": args.window / cpu,
               "batch_latency_p50_s": float(np.median(latencies)), "rss_mib": rss_mib(),
               "rss_trimmed_mib": _trimmed_rss()}
        if args.engine != "old":
            row["stored_frames"] = len(recon._store)
            row["index_entries"] = recon._index.n_entries
        rows.append(row)
        print(f"  {args.engine} {point:>7} frames: {row['frames_per_s']:7.0f} frames/s, "
              f"RSS {row['rss_mib']:7.0f} MiB ({row['rss_trimmed_mib']:.0f} trimmed)",
              file=sys.stderr, flush=True)
    return {"engine": args.engine, "unique_frames": unique, "rss_start_mib": rss_start,
            "points": rows,
            "canvas": list(shape), "seconds": time.perf_counter() - start}


def _fastest(runs: list[dict]) -> list[dict]:
    """Per point, the row of the run with the most frames/s."""
    by_point: dict[int, dict] = {}
    for run in runs:
        for row in run["points"]:
            if row["frames_per_s"] > by_point.get(row["frames"], {}).get("frames_per_s", -1):
                by_point[row["frames"]] = row
    return [by_point[k] for k in sorted(by_point)]


def scaling(args, device: torch.device) -> None:
    """Both engines, each in its own process, ``--repeats`` times alternating (the machine may
    be shared: the fastest run per point is the one least disturbed); the table, and the JSON
    entry."""
    load_before = os.getloadavg()
    runs: dict[str, list] = {"new": [], "budget": [], "old": []}
    for _, engine in ((r, e) for r in range(args.repeats) for e in runs):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", engine,
               "--budget-mb", str(args.budget_mb),
               "--threads", str(args.threads), "--batch", str(args.batch),
               "--model", args.model, "--device", str(device), "--window", str(args.window),
               "--unique", str(args.unique), "--old-up-to", str(args.old_up_to),
               "--points", *map(str, args.points), *(["--full"] if args.full else [])]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {engine: _fastest(r) for engine, r in runs.items()}
    old = {row["frames"]: row for row in best["old"]}
    budget = {row["frames"]: row for row in best["budget"]}
    head = f"{'frames/s':>9} {'/cpu-s':>7} {'RSS MiB':>8} {'trimmed':>8}"
    print(f"\n{'':>8} | {'new (grid hash)':^35} | "
          f"{f'new, {args.budget_mb} MiB of frames':^35} | {'old (full history)':^35}")
    print(f"{'frames':>8} | {head} | {head} | {head}")

    def cells(row) -> str:
        if row is None:
            return f"{'-':>9} {'-':>7} {'-':>8} {'-':>8}"
        return (f"{row['frames_per_s']:9.0f} {row['frames_per_cpu_s']:7.0f} "
                f"{row['rss_mib']:8.0f} {row['rss_trimmed_mib']:8.0f}")

    for row in best["new"]:
        print(f"{row['frames']:8d} | {cells(row)} | {cells(budget.get(row['frames']))} | "
              f"{cells(old.get(row['frames']))}")
    entry = {
        "machine": machine(), "threads": args.threads, "device": str(device),
        "batch": args.batch, "model": args.model, "window_frames": args.window,
        "unique_frames": runs["new"][0]["unique_frames"], "repeats": args.repeats,
        "scan": f"Fermat spiral, step 400/sqrt({args.unique}) px, one position per frame; "
                "the simulated frames reused in turn",
        "between_windows": "every frame through the network" if args.full else
        "fast-forwarded: grouping and frame store only (see scaling_run)",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "note": "points: per point, the fastest of the runs (its RSS with it); runs: all",
        "new": {"points": best["new"], "runs": runs["new"]},
        "budget": {"frame_memory_mib": args.budget_mb, "points": best["budget"],
                   "runs": runs["budget"]},
        "old_full_history": {"points": best["old"], "runs": runs["old"]},
        "date": time.strftime("%Y-%m-%d"),
    }
    path = _result_path(device)
    result = json.loads(path.read_text()) if path.exists() else {}
    result["scaling"] = entry
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
