"""Remote workers over NATS JetStream: throughput, latency, overhead, take-over time.

    .venv/bin/python bench/bus.py [--runs 4] [--points 100] [--ack-wait-s 5] [--out ...]

Everything real and on this machine: an embedded Tiled server and a nats-server (JetStream,
temporary store) on 127.0.0.1, the simulated beamline writing HDF5 files under a RunEngine,
``bluesky-ptychopinn worker`` subprocesses (CPU, 1 torch thread each, network only, frames
read through Tiled).

1. Throughput: ``--runs`` raw runs of ``--points`` frames are published first (a backlog),
   then 1 worker, and in a second round 2 workers, reconstruct them; frames per second from the
   first ``took run`` to the last ``finished run`` in the workers' logs. Once with the frames
   read through Tiled (the default), once from the files (``--path-map``). The derived runs of
   a round are deleted before the next (the deterministic uid would otherwise keep them).
2. Latency: frame acquisition (the raw event's time) -> the first derived snapshot holding it
   readable in Tiled (the snapshot array's length polled every 100 ms), p50/p90, through the
   bus and one worker vs the same LiveReconstruction in the RunEngine's process
   (``isolation="thread"``) writing to the same Tiled.
3. Per-message overhead: the publisher's cost on the RunEngine thread per document (encode +
   append; an event of an HDF5 detector, and one with an inline 64x64 uint32 frame), and the
   bus's cost per document (acknowledged JetStream publish, sequential: the publisher's mode).
4. Take-over: two workers, a slow scan; the worker that takes it is SIGKILLed mid-run; time
   from the kill to the other worker's ``took`` (the ack deadline, ``--ack-wait-s``) and to its
   ``finished``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core import machine  # noqa: E402

from bluesky_ptychopinn.catalog import EmbeddedTiled  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402
from bluesky_ptychopinn.distributed import NatsServer, publish_documents  # noqa: E402
from bluesky_ptychopinn.distributed._server import die_with_parent  # noqa: E402
from bluesky_ptychopinn.plans import ptycho_scan  # noqa: E402

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(took|finished) run "
                      r"([0-9a-f-]{36})", re.M)


class Worker:
    """``bluesky-ptychopinn worker`` in a subprocess, its log in a file."""

    def __init__(self, log: Path, bus: str, tiled: EmbeddedTiled, beamline: str,
                 ack_wait_s: float, *extra: str) -> None:
        self.log = log
        cmd = [sys.executable, "-c", "from bluesky_ptychopinn.cli import app; app()", "worker",
               "--bus", bus, "--tiled", tiled.uri, "--api-key", tiled.api_key,
               "--beamline", beamline, "--device", "cpu", "--no-refine", "--batch-size", "32",
               "--torch-threads", "1", "--ack-wait-s", str(ack_wait_s),
               "--report-every-s", "5", *extra]
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)

    def text(self) -> str:
        return self.log.read_text()

    def events(self) -> list[tuple[float, str, str]]:
        """(unix time, 'took'|'finished', raw uid) from the log."""
        out = []
        for stamp, what, uid in LOG_TIME.findall(self.text()):
            t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, what, uid))
        return out

    def wait_for(self, pattern: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker: no {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def _scan(RE, bl, points: int):
    n_side = int(round(np.sqrt(points)))
    dx = bl.pixel_size_m
    result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                            step_m=5 * dx))
    return result.run_start_uids[0], n_side * n_side


def _engine(tiled, bus_url, beamline, sent=None):
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter

    RE = RunEngine(call_returns_result=True)
    RE.subscribe(TiledWriter(tiled.client(), batch_size=4))
    if sent is not None:
        RE.subscribe(lambda name, doc: sent.append((name, doc)))
    handle = publish_documents(RE, bus_url, beamline=beamline) if bus_url else None
    return RE, handle


def _derived_uids(client, raw_uid):
    from tiled.queries import Key

    return list(client.search(Key("start.original_run_uid") == raw_uid))


def throughput(tiled, bus, work: Path, runs: int, points: int, ack_wait_s: float) -> dict:
    RE, handle = _engine(tiled, bus.url, "thru")
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=1)
    uids, frames = [], 0
    for _ in range(runs):
        uid, n = _scan(RE, bl, points)
        uids.append(uid)
        frames += n
    handle.flush(60)
    out = {"runs": runs, "frames": frames}
    client = tiled.client()
    det = str(Path(tiled.detector_dir).resolve())
    rounds = [("tiled", 1), ("tiled", 2), ("path_map", 1), ("path_map", 2)]
    for i, (via, n_workers) in enumerate(rounds):
        for uid in uids:  # a later round must reconstruct again, not find complete derived runs
            for d in _derived_uids(client, uid):
                client[d].delete(recursive=True, external_only=False)
        if i:  # the backlog again: re-announce the same runs
            asyncio.run(_reannounce(bus.url, "thru", uids, f"round{i}"))
        extra = ("--path-map", f"{det}={det}") if via == "path_map" else ()
        workers = [Worker(work / f"thru_{via}{n_workers}_{k}.log", bus.url, tiled, "thru",
                          ack_wait_s, *extra) for k in range(n_workers)]
        try:
            deadline = time.monotonic() + 600
            while True:
                events = [e for w in workers for e in w.events()]
                if {u for _, what, u in events if what == "finished"} >= set(uids):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("throughput round did not finish")
                time.sleep(0.2)
        finally:
            for w in workers:
                w.stop()
        t0 = min(t for t, what, _ in events if what == "took")
        t1 = max(t for t, what, _ in events if what == "finished")
        out.setdefault(f"frames_{via}", {})[f"{n_workers}_workers"] = {
            "wall_s": round(t1 - t0, 2), "frames_per_s": round(frames / (t1 - t0), 1),
            "runs_per_worker": [sum(1 for e in w.events() if e[1] == "finished")
                                for w in workers]}
    for via in ("tiled", "path_map"):
        r = out[f"frames_{via}"]
        r["speedup"] = round(r["2_workers"]["frames_per_s"] / r["1_workers"]["frames_per_s"], 2)
    return out


async def _reannounce(url: str, beamline: str, uids: list[str], tag: str) -> None:
    """Announce runs again (new message ids: the first announcements were consumed)."""
    import nats

    from bluesky_ptychopinn.distributed import runs_subject
    from bluesky_ptychopinn.distributed._codec import encode

    nc = await nats.connect(url)
    js = nc.jetstream()
    for uid in uids:
        await js.publish(runs_subject(beamline), encode("run", {"uid": uid}),
                         headers={"Nats-Msg-Id": f"bench-{tag}:{uid}"})
    await nc.close()


def _poll_from_start(client, stop: threading.Event, seen: list):
    """A RunEngine subscriber that starts :func:`_poll_snapshots` at each raw start."""

    def on_start(name, doc):
        if name == "start":
            threading.Thread(target=_poll_snapshots, args=(client, doc["uid"], stop, seen),
                             daemon=True).start()

    return on_start


def _poll_snapshots(client, raw_uid: str, stop: threading.Event, seen: list) -> None:
    """The time each derived snapshot first became readable in Tiled (``seen[k]``: snapshot k).

    Every 0.1 s the length of the snapshot image array (a zarr node: one catalog read). The
    embedded Tiled's DuckDB tables (the scalar columns) are not read while they are written:
    concurrent reads and appends of one table crash it (tiled 0.2.20 + ADBC DuckDB).
    """
    derived, node = None, None
    while not stop.is_set():
        time.sleep(0.1)
        try:
            if derived is None:
                found = _derived_uids(client, raw_uid)
                if not found:
                    continue
                derived = found[0]
            if node is None:
                node = client[derived]["snapshots"]["object_phase"]
            else:
                node.refresh()
        except Exception:  # not there yet
            continue
        now = time.time()
        seen.extend([now] * (int(node.shape[0]) - len(seen)))


def _latency_of(client, raw_uid: str, sent, seen) -> dict:
    """Frame time (its raw event's ``time``) -> the first snapshot holding it in Tiled."""
    frames = np.asarray(client[_derived_uids(client, raw_uid)[0]]["snapshots"]["frames"].read())
    primary = {d["uid"] for n, d in sent if n == "descriptor" and d.get("name") == "primary"}
    times = [d["time"] for n, d in sent if n == "event" and d["descriptor"] in primary]
    lat = [seen[k] - times[int(f) - 1] for k, f in enumerate(frames[:len(seen)])
           if 0 < f <= len(times)]
    return {"snapshots": len(lat), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p90_s": round(float(np.percentile(lat, 90)), 3),
            "max_s": round(float(np.max(lat)), 3)}


def latency(tiled, bus, work: Path, points: int, exposure_s: float, ack_wait_s: float) -> dict:
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_ptychopinn.callbacks import LiveReconstruction

    client = tiled.client()
    out = {"points": points, "exposure_s": exposure_s}
    # through the bus: one warm worker
    w = Worker(work / "latency.log", bus.url, tiled, "lat", ack_wait_s)
    try:
        w.wait_for("ready on")
        sent: list = []
        RE, handle = _engine(tiled, bus.url, "lat", sent)
        bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=2, exposure_s=exposure_s)
        stop, seen = threading.Event(), []
        RE.subscribe(_poll_from_start(client, stop, seen))
        uid, _ = _scan(RE, bl, points)
        handle.flush(60)
        w.wait_for(f"finished run {uid}")
        time.sleep(0.3)
        stop.set()
        out["bus"] = _latency_of(client, uid, sent, seen)
    finally:
        w.stop()
    # in-process: the same callback settings in a thread of the RunEngine's process
    live = LiveReconstruction("default", isolation="thread", refine=None, device="cpu",
                              torch_threads=1, batch_size=32, derived_uid="deterministic")
    live.subscribe(TiledWriter(client, batch_size=1))
    sent = []
    RE, _ = _engine(tiled, None, "lat", sent)
    RE.subscribe(live)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=3, exposure_s=exposure_s)
    stop, seen = threading.Event(), []
    RE.subscribe(_poll_from_start(client, stop, seen))
    uid, _ = _scan(RE, bl, points)
    live.wait(uid, timeout=300)
    time.sleep(0.3)
    stop.set()
    live.close()
    out["in_process"] = _latency_of(client, uid, sent, seen)
    return out


def overhead(bus, n: int = 5000) -> dict:
    from bluesky_ptychopinn.distributed import DocumentPublisher

    pub = DocumentPublisher(bus.url, beamline="ovh", max_buffer=10 * n)
    pub("start", {"uid": "run-ovh", "time": time.time()})
    pub("descriptor", {"uid": "desc-ovh", "run_start": "run-ovh", "data_keys": {}})
    pub.flush(30)
    base = {"descriptor": "desc-ovh", "time": time.time(), "timestamps": {"x": 1.0, "y": 1.0},
            "filled": {}}
    hdf5 = [{**base, "uid": f"e{i}", "seq_num": i + 1, "data": {"x": 1e-6, "y": 2e-6}}
            for i in range(n)]
    frame = np.random.default_rng(0).poisson(50, (64, 64)).astype(np.uint32)
    inline = [{**base, "uid": f"i{i}", "seq_num": n + i + 1,
               "data": {"x": 1e-6, "y": 2e-6, "det_image": frame}} for i in range(n // 5)]
    out = {}
    for label, docs in (("event_hdf5", hdf5), ("event_inline_64x64_uint32", inline)):
        pub.flush(60)
        t0 = time.perf_counter()
        for doc in docs:
            pub("event", doc)
        t_call = time.perf_counter() - t0
        pub.flush(120)
        t_all = time.perf_counter() - t0
        out[label] = {"documents": len(docs),
                      "runengine_thread_us_per_doc": round(1e6 * t_call / len(docs), 1),
                      "bus_us_per_doc_acknowledged": round(1e6 * t_all / len(docs), 1)}
    out["final_stats"] = pub.close().__dict__
    return out


def takeover(tiled, bus, work: Path, points: int, ack_wait_s: float) -> dict:
    workers = [Worker(work / f"kill{k}.log", bus.url, tiled, "kill", ack_wait_s)
               for k in range(2)]
    try:
        for w in workers:
            w.wait_for("ready on")
        RE, handle = _engine(tiled, bus.url, "kill")
        bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=4, exposure_s=0.1)
        killed: dict = {}

        def killer():
            while not killed:
                for k, w in enumerate(workers):
                    if "took run" in w.text():
                        time.sleep(1.0)  # mid-run
                        w.proc.send_signal(signal.SIGKILL)
                        w.proc.wait()
                        killed.update(k=k, t=time.time())
                        return
                time.sleep(0.02)

        thread = threading.Thread(target=killer)
        thread.start()
        uid, _ = _scan(RE, bl, points)
        thread.join()
        handle.close()
        other = workers[1 - killed["k"]]
        other.wait_for(f"finished run {uid}", timeout=300)
        events = {what: t for t, what, u in other.events() if u == uid}
        return {"ack_wait_s": ack_wait_s, "points": points,
                "kill_to_taken_s": round(events["took"] - killed["t"], 2),
                "kill_to_finished_s": round(events["finished"] - killed["t"], 2)}
    finally:
        for w in workers:
            w.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--ack-wait-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bus.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with (EmbeddedTiled(tmp / "catalog", readable=[tmp / "detector"]) as tiled,
              NatsServer(tmp / "nats") as bus):
            tiled.detector_dir = tmp / "detector"
            result = {
                "command": "python bench/bus.py " + " ".join(sys.argv[1:]),
                "machine": machine(),
                "load_before": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            result["overhead"] = overhead(bus)
            print(json.dumps(result["overhead"], indent=1), flush=True)
            result["throughput"] = throughput(tiled, bus, tmp, args.runs, args.points,
                                              args.ack_wait_s)
            print(json.dumps(result["throughput"], indent=1), flush=True)
            result["latency"] = latency(tiled, bus, tmp, args.points, 0.02, args.ack_wait_s)
            print(json.dumps(result["latency"], indent=1), flush=True)
            result["takeover"] = takeover(tiled, bus, tmp, args.points, args.ack_wait_s)
            print(json.dumps(result["takeover"], indent=1), flush=True)
            result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
