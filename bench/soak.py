"""Soak: scan after scan through the live pipeline into Tiled; does anything grow?

    .venv/bin/python bench/soak.py [--runs 100] [--frames 1000] [--refine-budget-s 1]

A beamline runs scan after scan for days. ``--runs`` runs of ``--frames`` frames each (real
event-model documents: start with ``ptycho`` metadata, descriptor, event pages of 16 inline
frames, stop) are fed to one ``LiveReconstruction`` (default ``isolation="process"``, refinement
on with a short budget) whose derived runs go through a ``TiledWriter`` to an embedded Tiled
server over HTTP on 127.0.0.1. After each run: RSS of this process and of the reconstruction
process, frames per second of the run, the derived run's exit status, and what the embedded
server's websocket streaming cache holds (bytes, entries: bounded by ``--stream-cache-mib``,
see bluesky_ptychopinn/catalog/_stream_cache.py). Warm-up: the first ``--warmup`` runs.
Writes ``bench/results/soak.json``.

Targets (issue 11): RSS growth after warm-up < 100 MB in every process; throughput at the end
within 10 % of the start (mean of the last 5 runs vs the first 5 after warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from event_model import compose_run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core import machine  # noqa: E402

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.callbacks import LiveReconstruction  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scan_frames(bl, n: int):
    dx = bl.pixel_size_m
    side = 150 * dx
    pos_m = physics.fermat_spiral_scan((side, side), side / np.sqrt(n))[:n]
    pos_px = physics.stage_to_pixels(pos_m, dx, origin_px=bl.detector.sample_origin_px)
    sim = physics.simulate_diffraction(bl.sample, bl.probe, pos_px, photons=1e6, seed=0)
    return sim.counts.numpy().astype(np.uint32), pos_m, side


def documents(bl, frames, pos_m, side: float, page: int = 16):
    md = {**bl.ptycho_metadata(), "detector_key": "det_image",
          "positioner_keys": {"y": "sy", "x": "sx"},
          "scan": {"extent_m": [side, side], "center_m": [0.0, 0.0]}}
    bundle = compose_run(metadata={"ptycho": md})
    keys = {"det_image": {"source": "sim", "dtype": "array", "shape": list(frames.shape[1:])},
            "sy": {"source": "sim", "dtype": "number", "shape": []},
            "sx": {"source": "sim", "dtype": "number", "shape": []}}
    desc = bundle.compose_descriptor(name="primary", data_keys=keys)
    yield "start", bundle.start_doc
    yield "descriptor", desc.descriptor_doc
    for lo in range(0, len(frames), page):
        hi = min(lo + page, len(frames))
        data = {"det_image": list(frames[lo:hi]), "sy": list(pos_m[lo:hi, 0]),
                "sx": list(pos_m[lo:hi, 1])}
        now = time.time()
        yield "event_page", desc.compose_event_page(
            data=data, timestamps={k: [now] * (hi - lo) for k in data},
            seq_num=list(range(lo + 1, hi + 1)), time=[now] * (hi - lo))
    yield "stop", bundle.compose_stop()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--refine-budget-s", type=float, default=1.0)
    parser.add_argument("--stream-cache-mib", type=float, default=None,
                        help="budget of the embedded server's streaming cache, MiB (default: "
                             "EmbeddedTiled's, 64)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    # Imported here, not at the top: the reconstruction process re-imports this script.
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychopinn.catalog import EmbeddedTiled
    from bluesky_ptychopinn.catalog._server import DEFAULT_STREAM_CACHE_MIB

    if args.stream_cache_mib is None:
        args.stream_cache_mib = DEFAULT_STREAM_CACHE_MIB

    bl = sim_beamline("cells", seed=2)
    frames, pos_m, side = scan_frames(bl, int(args.frames * 1.28))  # the spiral keeps ~78 %
    frames, pos_m = frames[: args.frames], pos_m[: args.frames]
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedTiled(
            Path(tmp) / "catalog", stream_cache_mib=args.stream_cache_mib) as server:
        client = server.client()
        live = LiveReconstruction("default", torch_threads=1,
                                  refine_budget_s=args.refine_budget_s)
        live.subscribe(TiledWriter(client))
        try:
            for k in range(args.runs):
                t0 = time.perf_counter()
                uid = None
                for name, doc in documents(bl, frames, pos_m, side):
                    uid = uid or doc["uid"]
                    live(name, doc)
                state = live.wait(uid, timeout=600)
                seconds = time.perf_counter() - t0
                status = client[state.derived_uid].metadata["stop"]["exit_status"]
                cache = server.stream_cache
                rows.append({"run": k, "seconds": seconds, "frames_per_s": len(frames) / seconds,
                             "rss_main_mib": rss_mib(), "rss_reconstruction_mib":
                             rss_mib(live.pid) if live.pid else None,
                             "frames_done": state.frames_done, "exit_status": status,
                             "stream_cache_mib": cache.nbytes / 2**20,
                             "stream_cache_entries": cache.entries})
                live.runs.pop(uid, None)  # a session keeps what it was asked to keep
                print(json.dumps(rows[-1]), flush=True)
        finally:
            live.close()
    after = rows[args.warmup:]
    first, last = after[:5], after[-5:]

    def mean(values):
        return float(np.mean([v for v in values if v is not None])) if values else None

    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": args.runs, "frames_per_run": len(frames), "warmup_runs": args.warmup,
        "frames_total": args.runs * len(frames), "wall_s": time.perf_counter() - t_start,
        "stream_cache_budget_mib": args.stream_cache_mib,
        "stream_cache_max_mib": max(r["stream_cache_mib"] for r in rows),
        "rss_main_start_mib": after[0]["rss_main_mib"],
        "rss_main_end_mib": after[-1]["rss_main_mib"],
        "rss_main_max_mib": max(r["rss_main_mib"] for r in after),
        "rss_reconstruction_start_mib": after[0]["rss_reconstruction_mib"],
        "rss_reconstruction_end_mib": after[-1]["rss_reconstruction_mib"],
        "rss_main_growth_mib": after[-1]["rss_main_mib"] - after[0]["rss_main_mib"],
        "rss_reconstruction_growth_mib": (after[-1]["rss_reconstruction_mib"]
                                          - after[0]["rss_reconstruction_mib"])
        if after[0]["rss_reconstruction_mib"] else None,
        "frames_per_s_start": mean([r["frames_per_s"] for r in first]),
        "frames_per_s_end": mean([r["frames_per_s"] for r in last]),
        "all_success": all(r["exit_status"] == "success" for r in rows),
        "rows": rows,
    }
    result["throughput_change_percent"] = 100 * (result["frames_per_s_end"]
                                                 / result["frames_per_s_start"] - 1)
    # Growth = the highest RSS after warm-up minus the first (not only the last minus the
    # first); the target is 100 MB = 95.4 MiB.
    rec = [r["rss_reconstruction_mib"] for r in after if r["rss_reconstruction_mib"]]
    result["rss_main_max_growth_mib"] = result["rss_main_max_mib"] - after[0]["rss_main_mib"]
    result["rss_reconstruction_max_growth_mib"] = max(rec) - rec[0] if rec else None
    limit_mib = 100e6 / 2**20
    result["met"] = (result["rss_main_max_growth_mib"] < limit_mib
                     and (result["rss_reconstruction_max_growth_mib"] or 0) < limit_mib
                     and abs(result["throughput_change_percent"]) <= 10)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return result


if __name__ == "__main__":
    main()
