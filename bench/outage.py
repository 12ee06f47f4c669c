"""Tiled outages (issue 11): what a scan and its runs go through when Tiled goes away mid-scan.

A real RunEngine scans the simulated beamline (23 x 23 raster, HDF5 detector files, 529
points as in the issue) with the wiring docs/beamline.md recommends: raw TiledWriter and the
derived one (LiveReconstruction, thread, network only) each behind SpooledWriter. A Tiled
server in a child process is SIGKILLed at point 149 and started again on the same port and
data directory ``outage`` seconds later (plus its own start-up time). Per outage it records the
scan's duration and exit status, documents emitted / spooled / delivered / redelivered, runs
replayed, how long after Tiled answered again the spool was empty, and what Tiled holds in the
end (rows, unique ``seq_num``, frames readable, duplicates, losses) for the raw and derived run.

    .venv/bin/python bench/outage.py                    # 0 (baseline), 10 and 75 s
    .venv/bin/python bench/outage.py --outages 0,10,75,300

Writes bench/results/outage.json (after each case, so a long run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tiled_process import TiledProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "outage.json"
KILL_AT_EVENT = 149
N_SIDE = 23


def _tiled_counts(client, docs: list[tuple[str, dict]], image_key: str | None) -> dict:
    """What Tiled holds for the run of ``docs`` against what was emitted."""
    start = next(d for n, d in docs if n == "start")
    streams = {d["uid"]: d["name"] for n, d in docs if n == "descriptor"}
    emitted: dict[str, int] = {}
    for name, doc in docs:
        if name in ("event", "event_page"):  # the derived run's metrics come as pages
            stream = streams[doc["descriptor"]]
            n = 1 if name == "event" else len(doc["seq_num"])
            emitted[stream] = emitted.get(stream, 0) + n
    run = client[start["uid"]]
    out = {"uid": start["uid"], "stop_in_tiled": "stop" in run.metadata, "streams": {}}
    for stream, n in emitted.items():
        base = run[stream].base
        seq = np.asarray(base["internal"].read(["seq_num"])["seq_num"])
        entry = {"events_emitted": n, "rows": len(seq), "unique_seq_num": len(set(seq.tolist())),
                 "duplicated": len(seq) - len(set(seq.tolist())),
                 "lost": n - len(set(seq.tolist()) & set(range(1, n + 1)))}
        if stream == "primary" and image_key is not None:
            entry["frames_readable"] = int(run[stream][image_key].read().shape[0])
        out["streams"][stream] = entry
    return out


def run_case(outage_s: float, root: Path, model) -> dict:
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.catalog import SpooledWriter
    from bluesky_ptychopinn.devices import sim_beamline
    from bluesky_ptychopinn.plans import ptycho_scan

    server = TiledProcess(root / f"outage-{outage_s:g}").start()
    client = server.client()
    spool = root / f"spool-{outage_s:g}"
    raw = SpooledWriter(TiledWriter(client, batch_size=50), spool_dir=spool, label="raw")
    derived = SpooledWriter(TiledWriter(client, batch_size=1), spool_dir=spool, label="derived")
    live = LiveReconstruction(model, isolation="thread", refine=None, torch_threads=1,
                              batch_size=64, snapshot_every=128, publish_interval_s=0.5)
    RE = RunEngine(call_returns_result=True)
    raw_docs: list = []
    derived_docs: list = []
    RE.subscribe(raw)
    RE.subscribe(lambda n, d: raw_docs.append((n, d)))
    live.subscribe(derived)
    live.subscribe(lambda n, d: derived_docs.append((n, d)))
    RE.subscribe(live)
    timeline: dict[str, float] = {}
    events = {"n": 0}

    def outage():
        timeline["killed"] = time.monotonic()
        server.kill()
        time.sleep(outage_s)
        server.start(timeout=120)
        timeline["answering"] = time.monotonic()

    def trigger(name, doc):
        if name == "event" and outage_s > 0:
            events["n"] += 1
            if events["n"] == KILL_AT_EVENT:
                threading.Thread(target=outage, daemon=True).start()

    RE.subscribe(trigger)
    bl = sim_beamline("cells", write_path=server.detector_dir, seed=21)
    bl.detector.dead_time = 0.08
    dx = bl.pixel_size_m
    t0 = time.monotonic()
    result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(5 * dx * (N_SIDE - 1),) * 2,
                            step_m=5 * dx))
    scan_s = time.monotonic() - t0
    live.wait(timeout=600)
    while outage_s > 0 and "answering" not in timeline:
        time.sleep(0.2)
    back = timeline.get("answering", time.monotonic())
    raw_ok, derived_ok = raw.flush(900), derived.flush(900)
    drained = time.monotonic()
    case = {
        "outage_s_requested": outage_s,
        "tiled_down_s": round(back - timeline["killed"], 1) if "killed" in timeline else 0.0,
        "killed_at_event": KILL_AT_EVENT if outage_s > 0 else None,
        "scan_s": round(scan_s, 1), "exit_status": result.exit_status,
        "delivered_s_after_tiled_answered": round(drained - back, 1),
        # the same moments on the scan's clock (0 = scan start): when Tiled went away, when it
        # answered again, when the scan ended, when both spools were empty
        "timeline_s": {"killed": round(timeline["killed"] - t0, 1) if "killed" in timeline
                       else None, "answering": round(back - t0, 1) if "killed" in timeline
                       else None, "scan_end": round(scan_s, 1),
                       "spool_empty": round(drained - t0, 1)},
        "spool_empty": raw_ok and derived_ok,
        "raw": {"documents_emitted": len(raw_docs), **raw.status()},
        "derived": {"documents_emitted": len(derived_docs), **derived.status()},
    }
    case["raw"]["tiled"] = _tiled_counts(client, raw_docs, bl.detector.image_key)
    case["derived"]["tiled"] = _tiled_counts(client, derived_docs, None)
    for side in ("raw", "derived"):
        case[side].pop("runs", None)
        case[side].pop("directory", None)
    raw.close()
    derived.close()
    live.close()
    server.kill()
    return case


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outages", default="0,10,75", help="Seconds, comma-separated.")
    parser.add_argument("--keep", type=Path, default=None,
                        help="Keep the catalogs, spools and server logs here.")
    args = parser.parse_args()
    from bluesky_ptychopinn.models import ModelRegistry

    model, _ = ModelRegistry().load("default")
    report = {"command": "bench/outage.py --outages " + args.outages,
              "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.platform()}",
              "load_avg_at_start": os.getloadavg()[0], "scan_points": N_SIDE ** 2,
              "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep is not None:
            tmp = str(args.keep)
        for outage_s in (float(x) for x in args.outages.split(",")):
            case = run_case(outage_s, Path(tmp), model)
            report["cases"].append(case)
            print(json.dumps({k: case[k] for k in ("outage_s_requested", "tiled_down_s",
                                                   "scan_s", "exit_status",
                                                   "delivered_s_after_tiled_answered")}),
                  flush=True)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
