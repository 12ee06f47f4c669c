"""Live keep-up: how fast an acquisition the live callback follows, how much it slows the
RunEngine, and the latency from a frame to its appearance in a Tiled snapshot.

    .venv/bin/python bench/live.py [--frames 2000] [--points 400] [--repeats 15]

1. Rate sweep: real event-model documents (start with ``ptycho`` metadata, descriptor, event
   pages of 16 frames) are fed to ``LiveReconstruction`` (default isolation: a separate
   process) at a fixed rate; a rate is *followed* when no frame is skipped and the derived run
   completes within 1 s of the last frame.
2. RunEngine slow-down: the same step scan (simulated beamline, inline detector) without the
   callback, with it reconstructing in a thread of the RunEngine's process
   (``isolation="thread"``) and with it reconstructing in a separate process
   (``isolation="process"``). Each configuration has its own process
   (``bench/_scan_worker.py``); their scans are interleaved ``--repeats`` times and each
   slow-down is the median of paired ratios (scan time / the scan without the callback in the
   same repeat). After each scan the reconstruction is allowed to finish so that it never
   overlaps the next timed scan.
   A control scan runs without the callback while another process spins on the other core:
   what any reconstruction on the same 2 cores costs, whatever its design.
   Once with a CPU-bound simulated detector (no exposure: the scan itself competes with the
   reconstruction for 2 cores) and once with a 5 ms exposure (the RunEngine waits on the
   detector, as at a beamline).
3. Latency: frame acquisition time -> the snapshot holding it written to an embedded Tiled
   (TiledWriter returned), p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from event_model import compose_run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core import machine  # noqa: E402

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.callbacks import LiveReconstruction  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402


def _frames(bl, n: int):
    dx = bl.pixel_size_m
    pos_m = physics.fermat_spiral_scan((150 * dx, 150 * dx), 150 * dx / np.sqrt(n))[:n]
    pos_px = physics.stage_to_pixels(pos_m, dx, origin_px=bl.detector.sample_origin_px)
    sim = physics.simulate_diffraction(bl.sample, bl.probe, pos_px, photons=1e6, seed=0)
    return sim.counts.numpy().astype(np.uint32), pos_m


def feed(live, bl, frames, pos_m, rate: float, page: int = 16) -> dict:
    md = {"ptycho": {**bl.ptycho_metadata(), "scan": {"extent_m": [2e-6, 2e-6],
                                                      "center_m": [0, 0]}}}
    run = compose_run(metadata=md)
    image, ky, kx = bl.detector.image_key, bl.stage.y.name, bl.stage.x.name
    n = frames.shape[-1]
    desc = run.compose_descriptor(name="primary", data_keys={
        image: {"source": "sim", "dtype": "array", "shape": [n, n], "dtype_numpy": "<u4"},
        ky: {"source": "sim", "dtype": "number", "shape": []},
        kx: {"source": "sim", "dtype": "number", "shape": []}})
    live("start", run.start_doc)
    live("descriptor", desc.descriptor_doc)
    start = time.perf_counter()
    for lo in range(0, len(frames), page):
        hi = min(lo + page, len(frames))
        due = start + hi / rate
        while time.perf_counter() < due:
            time.sleep(0.0005)
        now = time.time()
        live("event_page", desc.compose_event_page(
            data={image: list(frames[lo:hi]), ky: pos_m[lo:hi, 0].tolist(),
                  kx: pos_m[lo:hi, 1].tolist()},
            timestamps={k: [now] * (hi - lo) for k in (image, ky, kx)},
            seq_num=list(range(lo + 1, hi + 1))))
    last = time.perf_counter()
    live("stop", run.compose_stop())
    state = live.wait(run.start_doc["uid"], timeout=600)
    lag = time.perf_counter() - last
    return {"rate": rate, "frames": len(frames), "skipped": state.frames_skipped,
            "done": state.frames_done, "lag_after_last_frame_s": lag,
            "followed": state.frames_skipped == 0 and lag < 1.0 and not state.failed}


#: Callback configurations: thread / process run the network and the refinement tier (the
#: default; process keeps one core for the RunEngine), process-allcores the same on every core
#: (``reserve_cores=0``), process-network the network alone.
ISOLATION_MODES = ("thread", "process", "process-allcores", "process-network")
#: A control: no callback, but another process keeps one core busy (nice +5, like the
#: reconstruction process): the floor of any reconstruction on the RunEngine's machine.
BUSY_LOOP = "import os\nos.nice(5)\nwhile True:\n    pass"
LABELS = ("without", "busy_core", *ISOLATION_MODES)


class _ScanWorker:
    """A ``bench/_scan_worker.py`` process: one RunEngine configuration, scans on request."""

    def __init__(self, isolation: str, points: int, exposure: float) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_scan_worker.py"), "--isolation", isolation,
             "--points", str(points), "--exposure", str(exposure)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"scan worker ({isolation}) did not start")

    def scan(self) -> dict:
        self.proc.stdin.write("scan\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(60)
        except Exception:
            self.proc.kill()


def runengine_slowdown(points: int = 400, dead_time: float = 0.0, repeats: int = 15) -> dict:
    """Scan time without the callback, with a busy core, and with each isolation mode.

    Every configuration runs in its own process (``bench/_scan_worker.py``), set up before any
    timing; the scans are interleaved, in an order that rotates from one repeat to the next.
    A mode's slow-down is the median over the repeats of its scan time divided by the time of
    the scan without the callback *in the same repeat* (paired, so that the machine's drift
    between repeats cancels), with the 25th-75th percentile range.
    """
    import subprocess

    workers = {"without": _ScanWorker("none", points, dead_time)}
    workers["busy_core"] = workers["without"]
    for mode in ISOLATION_MODES:
        workers[mode] = _ScanWorker(mode, points, dead_time)
    timings: dict[str, list[float]] = {label: [] for label in LABELS}
    try:
        for repeat in range(repeats):
            order = LABELS[repeat % len(LABELS):] + LABELS[:repeat % len(LABELS)]
            for label in order:
                busy = None
                if label == "busy_core":
                    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
                    time.sleep(0.5)  # past its start-up: only the spinning overlaps the scan
                result = workers[label].scan()
                if busy is not None:
                    busy.kill()
                    busy.wait()
                if label in ISOLATION_MODES:
                    assert result["failed"] is None, result
                    assert result["frames_done"] == result["points"], result
                timings[label].append(result["seconds"])
    finally:
        for label in ("without", *ISOLATION_MODES):
            workers[label].close()
    base = np.asarray(timings["without"])
    ratios = {label: np.asarray(timings[label]) / base for label in LABELS if label != "without"}
    return {"points": result["points"], "exposure_s": dead_time, "repeats": repeats,
            "seconds_all": timings,
            "seconds_median": {label: float(np.median(v)) for label, v in timings.items()},
            "slowdown_percent": {label: 100 * float(np.median(r) - 1)
                                 for label, r in ratios.items()},
            "slowdown_percent_iqr": {label: [100 * float(np.percentile(r, q) - 1)
                                             for q in (25, 75)]
                                     for label, r in ratios.items()},
            "slowdown_percent_best_of": {label: 100 * (min(timings[label]) / float(base.min())
                                                       - 1)
                                         for label in ratios}}


def latency(bl, frames, pos_m, rate: float, isolation: str = "process") -> dict:
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychopinn.catalog import EmbeddedTiled

    with tempfile.TemporaryDirectory() as tmp, EmbeddedTiled(Path(tmp)) as tiled:
        writer = TiledWriter(tiled.client(), batch_size=1)
        live = LiveReconstruction("default", batch_size=32, snapshot_every=64, torch_threads=1,
                                  isolation=isolation)
        stamps: list[float] = []
        acquired: dict[int, float] = {}

        def timed_writer(name, doc):
            writer(name, doc)
            # network snapshots only (the refined streams carry object images too)
            if name == "event" and "uncertainty" in doc["data"]:
                n_in = int(doc["data"]["frames"])
                stamps.append(time.time() - acquired.get(n_in, time.time()))

        def clock(name, doc):  # acquisition time of frame k (1-based count)
            if name == "event_page":
                for s, t in zip(doc["seq_num"], doc["time"], strict=True):
                    acquired[s] = t
            live(name, doc)

        live.subscribe(timed_writer)
        feed(_Forward(clock, live), bl, frames, pos_m, rate)
        live.close()
    arr = np.asarray(stamps)
    return {"rate": rate, "snapshots": len(arr), "snapshot_every": live.snapshot_every,
            "publish_interval_s": live.settings.publish_interval_s,
            "latency_p50_s": float(np.percentile(arr, 50)),
            "latency_p99_s": float(np.percentile(arr, 99))}


class _Forward:
    """Route documents through ``fn`` but keep the callback's ``wait`` API."""

    def __init__(self, fn, live):
        self.fn, self.live = fn, live

    def __call__(self, name, doc):
        self.fn(name, doc)

    def wait(self, *args, **kwargs):
        return self.live.wait(*args, **kwargs)


def other_cpu_busy(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes while this one sleeps (Linux /proc/stat; 0 elsewhere)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait (clock ticks)

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rates", default="250,500,1000,1500,2000")
    parser.add_argument("--points", type=int, default=400, help="RunEngine slow-down scan")
    parser.add_argument("--repeats", type=int, default=15,
                        help="RunEngine slow-down: interleaved repeats")
    parser.add_argument("--only", choices=("all", "runengine"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)  # also the simulated detector's, in every mode alike
    result = {"machine": machine(), "torch_threads": 1, "date": time.strftime("%Y-%m-%d"),
              "command": "bench/live.py " + " ".join(sys.argv[1:]),
              "os_nice": os.nice(0), "other_cpu_busy_cores_before": other_cpu_busy()}
    # CPU-bound simulated detector (no exposure time) and a 5 ms exposure, as at a beamline
    result["runengine"] = [runengine_slowdown(args.points, d, args.repeats)
                           for d in (0.0, 0.005)]
    result["other_cpu_busy_cores_after_runengine"] = other_cpu_busy()
    print(json.dumps(result["runengine"], indent=2), flush=True)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    if args.only == "runengine":  # keep the other sections of an earlier full run
        previous = out / "live.json"
        old = json.loads(previous.read_text()) if previous.exists() else {}
        # the other sections keep their own date and machine
        result = {**old, **result, "runengine_date": result["date"],
                  "runengine_machine": result["machine"],
                  "date": old.get("date", result["date"]),
                  "machine": old.get("machine", result["machine"])}
        (out / "live.json").write_text(json.dumps(result, indent=2))
        return
    bl = sim_beamline("cells", sample_shape=(256, 256))
    frames, pos_m = _frames(bl, args.frames)
    sweep = []
    for rate in (float(r) for r in args.rates.split(",")):
        # The network's follow rate: refinement off, since a run with it on completes only
        # after its post-scan refinement (bench/quality.py times that separately).
        live = LiveReconstruction("default", batch_size=64, snapshot_every=256,
                                  torch_threads=1, max_queue=400, refine=None)
        sweep.append(feed(live, bl, frames, pos_m, rate))
        live.close()
        print(sweep[-1], flush=True)
    followed = [r["rate"] for r in sweep if r["followed"]]
    # the same in a thread of this process, for comparison (one rate, and the latency)
    live = LiveReconstruction("default", batch_size=64, snapshot_every=256, torch_threads=1,
                              max_queue=400, isolation="thread", refine=None)
    thread_sweep = feed(live, bl, frames, pos_m, 1000.0)
    result.update({
        "isolation": "process",
        "rate_sweep": sweep, "max_rate_followed_frames_per_s": max(followed, default=0),
        "latency": latency(bl, frames[:1000], pos_m[:1000], 200.0),
        "thread": {"rate_1000": thread_sweep,
                   "latency": latency(bl, frames[:1000], pos_m[:1000], 200.0, "thread")},
    })
    (out / "live.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
